"""Credentials never shown or stored: `http://user:KEY@host/v1` becomes `http://***@host/v1`.

Used wherever a URL may reach the screen or the disk: `dump_config` (every
config.yaml a command writes), the generate cache manifest and fingerprint,
request errors, and the CLI's error printer.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# scheme://userinfo@ ; userinfo stops at the first '/', '@' or whitespace after the scheme.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")
MASK = "***"


def redact_text(text: str) -> str:
    """Mask the user:password part of every URL in `text`."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def redact_tree(value):
    """A copy of a JSON-like tree with every URL's credentials masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return value


def url_secrets(url: str | None) -> list[str]:
    """The user name / password of a URL, for redacting them where they appear alone."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    return [secret for secret in (parts.password, parts.username) if secret]
