"""The one exception type users see: a clear, one-line message and a non-zero exit.

`io_reason` and `WriteError` are the one mapping of an operating-system failure (a full disk,
a read-only or unwritable folder, an I/O error, a path through a regular file...) to such a
line: `error: cannot write <path>: <reason>`.
"""

from __future__ import annotations

import errno
import os
import re

# The failures a write meets on a real machine; their texts are what the OS says (strerror).
IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
             errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOENT,
             errno.EMFILE, errno.ENFILE)
_OS_ERROR_CODE = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) quote errno


class PlvmError(Exception):
    """A problem with the user's input or files, explained in one line.

    The CLI prints `error: <message>` and exits with status 1; anything else that escapes
    is a bug and keeps its traceback.
    """


class WriteError(PlvmError):
    """A file or folder could not be written: `cannot write <path>: <reason>`."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason}")


def io_reason(error: BaseException) -> str | None:
    """What the OS said, when `error` is an I/O failure: an OSError, or a library's error that
    quotes one (safetensors' SafetensorError, faiss' RuntimeError); None for anything else."""
    if isinstance(error, OSError):
        if error.errno is None:
            return str(error)
        return error.strerror or os.strerror(error.errno)
    if isinstance(error, PlvmError):
        return None
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code:
        return os.strerror(int(code.group(1)))
    for number in IO_ERRNOS:
        if os.strerror(number) in text:
            return os.strerror(number)
    return None
