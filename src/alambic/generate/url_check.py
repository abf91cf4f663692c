"""The shape of a server address, checked while a config validates (no other alambic import: config code calls it)."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_base_url(value: str | None) -> str | None:
    """`http://host[:port]/path` or `https://...`; anything else cannot be a server address."""
    if value is None:
        return value
    try:
        parts = urlsplit(value.strip())
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        shown = value if "@" not in value else "<url with credentials>"
        raise ValueError(
            f"base_url {shown!r} is not an http(s) URL with a host; write it like http://127.0.0.1:8000/v1 "
            "or https://api.openai.com/v1"
        )
    return value.strip()
