"""Atomic file writes (a file is replaced whole or not at all) and file names as text.

Everything dc_tf writes goes through a temporary file beside its destination (so on the same
filesystem), flushed to disk and then renamed over it: a process killed at any moment, or a full
disk, leaves either the previous file or the new one, never half of one. Only a run's metrics are
appended to instead, one line per write (RunDir.truncate_metrics drops a torn last line).
"""

import contextlib
import os
import re
from typing import IO, Iterator, Union


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_args) -> Iterator[IO]:
    """Opens PATH.tmp for writing (folders created) and renames it to `path` once the block
    completes; if the block raises, `path` stays as it was and the temporary file is removed.

    Args:
      path: the file to write.
      mode: "w" (text) or "wb" (bytes).
      open_args: passed to open(), e.g. encoding="utf-8" or newline="".
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write(path: str, content: Union[str, bytes]) -> None:
    """Writes `content` (text as UTF-8) to `path` through atomic_open."""
    if isinstance(content, bytes):
        with atomic_open(path, "wb") as f:
            f.write(content)
    else:
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(content)


def printable(path: str) -> str:
    """`path` as one line of text any UTF-8 file can hold: the bytes of a name that are not UTF-8
    (os.walk's surrogate escapes) and control characters (a tab or a newline would split a .tsv
    row) as \\xNN, as Python's backslashreplace writes them, and a backslash itself as \\x5c, so
    that `from_printable` gives the path back exactly."""
    def escaped(ch: str) -> str:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
            return f"\\x{code - 0xDC00:02x}"
        return f"\\x{code:02x}" if code < 0x20 or code == 0x7F or ch == "\\" else ch

    return "".join(map(escaped, os.fsencode(path).decode("utf-8", "surrogateescape")))


def from_printable(text: str) -> str:
    """The path that `printable` wrote as `text` (os.walk's str, surrogate escapes included)."""
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 text.encode("utf-8"))
    return os.fsdecode(raw)
