"""Atomic writes and hashing: nothing half-written is ever left under a real name.

Every write goes to a temporary file next to its target, is flushed to the disk (fsync), then
renamed over the target, and the folder is flushed too. A temporary's name says which process
writes it (`.NAME.PID.*.tmp`), so one left by a writer that was killed is removed by the next
write of the same target. A failure at any of those steps
removes the temporary file, leaves the target as it was and becomes one line,
`cannot write <path>: <reason>` (errors.WriteError), whatever the OS or the library said.
Libraries that would swallow an error (faiss ignores a failing close) write through
`atomic_writer`, whose writes are plain `os.write` calls.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import PlvmError, WriteError, io_reason


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into WriteError(path): for writes that are not
    atomic by nature (appending to a log, making a folder)."""
    try:
        yield
    except WriteError as error:  # from a file inside `path` (a temporary one): name `path`
        if Path(error.path) == Path(path):
            raise
        raise WriteError(path, error.reason) from error
    except Exception as error:
        reason = io_reason(error)
        if reason is None:
            raise
        raise WriteError(path, reason) from error


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_prefix(path: Path) -> str:
    """`.NAME.PID.`: a temporary file or folder names its target and the process writing it."""
    return f".{path.name}.{os.getpid()}."


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` left by writers that died before their rename (a
    SIGKILL, a power cut): `.NAME.PID.*.tmp` whose process no longer exists. A live writer's
    temporary is never touched. Returns what was removed."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = candidate.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or not _process_is_gone(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if candidate.is_dir():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
    return removed


NEW_FILE_MODE = 0o644  # what an atomic writer gives a file that did not exist


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success flush it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left exactly as it was; an
    I/O failure becomes WriteError(path). The file gets `mode` when given (a secret: 0600 from
    its first byte), else the mode of the one it replaces, or NEW_FILE_MODE (a temporary file
    starts private, 0600, which is no mode for a concept or a report others read).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            if mode is None:
                mode = path.stat().st_mode & 0o7777 if path.is_file() else NEW_FILE_MODE
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(path):
            yield tmp_path
            fsync_path(tmp_path)
            os.replace(tmp_path, path)
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise


class _Writer(io.RawIOBase):
    """A binary file whose every write is an `os.write` on `fd`, failures included."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            view = view[os.write(self.fd, view):]
        return size


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: int | None = None) -> Iterator[io.RawIOBase]:
    """Yield a binary file to write `path` through, atomically (see `atomic_path`)."""
    with atomic_path(path, mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            yield _Writer(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(path: str | os.PathLike, obj, mode: int | None = None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def write_image_atomic(path: str | os.PathLike, image, format: str = "PNG") -> None:
    """Write a PIL image (a plot, a toy photo) atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    write_bytes_atomic(path, buffer.getvalue())


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """PlvmError before a long job when the disk under `folder` clearly cannot hold `needed`
    bytes (its estimated output)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PlvmError(f"not enough free space for {what} in {folder}: about {_size(needed)} "
                        f"needed, {_size(free)} free")


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def replace_folder(new: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rename the complete folder `new` to `folder`, replacing an older one safely.

    The old folder is first renamed to a `.NAME.*.old` backup and removed only after the new
    one is in place: a crash between the two renames leaves that backup, never a half folder.
    """
    new, folder = Path(new), Path(folder)
    backup: Path | None = None
    with writing(folder):
        if folder.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            backup.rmdir()  # only the unique name is wanted
            os.replace(folder, backup)
        try:
            os.replace(new, folder)
        except BaseException:
            if backup is not None and not folder.exists():
                os.replace(backup, folder)
            raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    with writing(folder):
        fsync_path(folder.parent)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `folder`; on success it replaces `folder`.

    On any exception the temporary folder is removed and `folder` is left as it was; an I/O
    failure becomes WriteError(folder).
    """
    folder = Path(folder)
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(folder)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(folder), suffix=".tmp", dir=folder.parent))
    try:
        with writing(folder):
            yield tmp
            replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
