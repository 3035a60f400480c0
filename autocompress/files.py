"""Writing a file, or a folder, so that no reader, and no crash, ever sees half of it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors) report a failed system call


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full: no trial can succeed until space is freed."""
    return isinstance(error, OSError) and error.errno in DISK_FULL


def as_os_error(error: Exception, path: Path) -> Exception:
    """`error` as the OSError it reports: safetensors raises its own error type for a failed write, naming the
    system's error code only in its message, so a full disk would not read as one."""
    found = None if isinstance(error, OSError) else _OS_ERROR_CODE.search(str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def sync_directory(folder: Path) -> None:
    """Make a rename inside `folder` durable: without it, a power cut can undo the rename after it returned."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Let `write` fill a temporary file beside `path` (given its name), flush it to disk, then rename it over
    `path`: a reader, a kill or a power cut sees the old file or the new one, never half of one. A full disk is an
    OSError with ENOSPC whatever library wrote the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(descriptor)
    os.chmod(temporary, 0o644)
    try:
        try:
            write(temporary)
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        except Exception as error:
            translated = as_os_error(error, path)
            if translated is error:
                raise
            raise translated from error
        os.replace(temporary, path)
        sync_directory(path.parent)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def staged_write(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` in a temporary sibling folder, then rename it to `out_dir`: never half an artifact."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write(staging)
        staging.chmod(0o755)
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Move the finished `staging` folder to `out_dir`, replacing what is there; its files are flushed to disk
    first, so that a power cut after the rename cannot leave the new folder's names with missing contents."""
    for path in staging.rglob("*"):
        if path.is_file():
            with path.open("rb+") as written:
                os.fsync(written.fileno())
    sync_directory(staging)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
        out_dir.rename(trash / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out_dir)
    sync_directory(out_dir.parent)
