"""A tiny Llama chat model written with numpy and `tokenizers` only (no torch import, < 1 s).

Random weights: it answers nonsense, which is all a server test needs. The
word-level tokenizer covers the words the tests send; its chat template marks
roles with special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("the a an is was not very good bad great awful fine movie film plot actor cat dog sat on mat "
         "positive negative neutral label answer rationale because so it this that what why how write "
         "list name give tell explain story poem about question prompt number").split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 64


def _tokenizer(folder: Path) -> int:
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-[]()")
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS + [s for s in symbols if s not in WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    for special in SPECIALS:
        tokenizer.add_special_tokens([special])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 256, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return len(vocab)


def _weights(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN), "lm_head.weight": normal(vocab_size, HIDDEN),
               "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "self_attn.q_proj.weight": normal(HEADS * head_dim, HIDDEN),
            prefix + "self_attn.k_proj.weight": normal(KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.v_proj.weight": normal(KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.o_proj.weight": normal(HIDDEN, HEADS * head_dim),
            prefix + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
            prefix + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            prefix + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
        })
    return tensors


def build_tiny_chat_model(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _tokenizer(folder)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    save_file(_weights(vocab_size, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
