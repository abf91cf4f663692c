"""The last line of defence: an input problem that escaped its own check still becomes a message.

Each command checks its inputs first (so nothing is written); this table turns
the few exception types that can only come from the user's files, folders or
settings into the same clear exit-2 message, never a traceback. Everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from alambic.errors import AlambicError


def _pydantic(err) -> AlambicError:
    lines = [f"invalid settings ({err.title}):"]
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  - {where}: {item['msg']}")
    return AlambicError("\n".join(lines), "fix the setting named above in the config or the key=value override")


def _os_error(err: OSError) -> AlambicError:
    where = f" {str(err.filename)!r}" if err.filename else ""
    return AlambicError(
        f"cannot use{where}: {err.strerror or err}",
        "check that the path exists, is the right kind (file or folder) and that you can write there",
    )


def translate(err: BaseException) -> AlambicError | None:
    """The user-facing error for `err`, or None when it is a bug."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return _pydantic(err)
    if isinstance(err, UnicodeDecodeError):
        return AlambicError(
            f"an input file is not UTF-8 text ({err.reason} at byte {err.start})",
            "save configs and data files as UTF-8",
        )
    if isinstance(err, (NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)):
        return _os_error(err)
    if type(err).__name__ == "SafetensorError":
        return AlambicError(f"a safetensors file is damaged ({err})", "copy or download the model folder again")
    return None
