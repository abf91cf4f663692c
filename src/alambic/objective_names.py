"""Names of the logit objectives, importable without torch (config validation stays fast)."""

OBJECTIVES: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "cosine",
)
