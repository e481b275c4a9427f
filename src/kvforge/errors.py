"""User-facing errors: one line naming the bad value and what is allowed."""

from __future__ import annotations

import os


class KVForgeError(ValueError):
    """A user mistake (bad argument, missing model, unsupported model). The CLI prints it as one line."""


def check_count(value, what: str, minimum: int = 1) -> int:
    """`value` must be an integer (not a bool) >= `minimum`; returns it, else a one-line KVForgeError naming
    `what` (an option or argument name)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVForgeError(f"{what}={value!r}; allowed: an integer >= {minimum}")
    return value


def read_text(path: str | os.PathLike, what: str = "file", encoding: str = "utf-8") -> str:
    """The text of `path` decoded as `encoding`; a missing, unreadable or undecodable file is a one-line
    KVForgeError naming `what`, the file and the encoding (with the offset of the first bad byte)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KVForgeError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    try:
        return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as e:
        raise KVForgeError(f"cannot read {what} {str(path)!r} as {encoding.upper()} text: byte "
                           f"0x{data[e.start]:02x} at offset {e.start} is not valid {encoding.upper()}; "
                           f"convert the file to {encoding.upper()} (e.g. iconv -t {encoding.upper()})") from None
