"""One writer per output: advisory locks (flock) that a process holds while it writes, and that the kernel
releases when it dies, however it dies.

- A stage run from its command line (pipeline/cli.py) holds a lock per output and on its resume directory
  for its whole life: a second process that would write the same files (a second working directory with
  the same `results:`, or a rerun beside the jobs of a killed Snakemake) stops at once with one error
  naming the output and the process that holds it, before it touches anything.
- A temporary file or directory that `atomic_output` writes is locked by its writer, so a leftover is
  removed only when no process holds it: its writer is gone.

The lock of `path` is the file `.<name>.lock` beside it; it holds the writer's pid, host, start time and
command line, and is deleted when the writer lets go (one a killed writer leaves is taken over and
deleted by the next one). Nothing here imports more than the standard library: the workflow reads it at
parse to find live writers before any job starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..common import StageError, log

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on fd without waiting; False if another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class WriterLock:
    """The lock on one output path; `acquire` raises StageError naming the process that holds it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = lock_path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                locked = _try_lock(fd)
            except OSError as err:
                os.close(fd)
                if err.errno in UNSUPPORTED:  # a file system without locks: no protection, say so once
                    log.warning("%s: the file system does not support locks (%s); two writers of it would not "
                                "be stopped", self.file, err)
                    return
                raise
            if not locked:
                holder = _holder(fd)
                os.close(fd)
                raise StageError(busy_message(self.path, holder), transient=True)
            if _is_current(fd, self.file):  # not a file its last holder deleted while we opened it
                self.fd = fd
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # who holds it is for the message of a second writer: best effort
            os.ftruncate(self.fd, 0)
            os.write(self.fd, json.dumps(_me()).encode())

    def _open(self) -> int:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StageError(f"no space left on the device while writing {self.path}; nothing was written "
                                 f"under that name (free space and rerun)", transient=True) from None
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()  # while still held: a process waiting on it sees it is gone and opens anew
        os.close(self.fd)
        self.fd = None


def _is_current(fd: int, file: Path) -> bool:
    try:
        return os.stat(file).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:400]}


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being written this very moment
        return {}


def busy_message(path: Path, holder: dict) -> str:
    who = (f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('since', '?')}: "
           f"{holder.get('command', '?')}" if "pid" in holder else f"see {lock_path(path)}")
    stop = f"kill {holder['pid']}" if "pid" in holder else "stop it"
    return (f"{path} is being written by another process ({who}). Two runs are writing the same outputs: a "
            f"second working directory with the same `results:`, or jobs of a killed Snakemake that are still "
            f"running. Wait for that process to end, or stop it ({stop}), then rerun")


@contextlib.contextmanager
def holding(paths: Iterable[str | Path]) -> Iterator[None]:
    """Hold the locks of `paths` (in a fixed order) for the block; StageError if another process holds one."""
    locks = [WriterLock(p) for p in sorted({os.path.abspath(p) for p in paths})]
    _enough_descriptors(len(locks))
    try:
        for lock in locks:
            lock.acquire()
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def _enough_descriptors(needed: int) -> None:
    """A job with many outputs (corpus shards) holds a descriptor per lock: raise the soft limit if needed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and needed + 256 > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY else
                                                    min(hard, needed + 256), hard))


def live_writer(path: str | Path) -> dict | None:
    """The holder of `path`'s lock if a live process holds it (its pid, host, start and command), else None."""
    file = lock_path(path)
    try:  # for writing: over NFS an exclusive lock needs it
        fd = os.open(file, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    try:
        if _try_lock(fd):
            return None  # a dead writer's leftover; closing lets go of it again
        return _holder(fd) or {"lock": str(file)}
    except OSError as err:
        if err.errno in UNSUPPORTED:
            return None
        raise
    finally:
        os.close(fd)


# ---- temporaries that only their writer may remove -------------------------------------------------
# A temporary directory holds the lock file WRITER, which its writer holds locked (a file, not the
# directory: over NFS an exclusive lock needs a file open for writing).
WRITER = ".writer"


def _open_writer(directory: Path) -> int | None:
    try:
        return os.open(directory / WRITER, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None


@contextlib.contextmanager
def locked_directory(make: Callable[[], str]) -> Iterator[Path]:
    """A new directory (from `make()`, e.g. tempfile.mkdtemp) locked by this process while the block
    runs, then removed. `remove_stale` never touches it meanwhile."""
    while True:
        directory = Path(make())
        try:
            fd = _open_writer(directory)
        except OSError:  # no room for the lock file: leave nothing behind
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if fd is None:  # a cleaner removed it before we could lock it: make another
            continue
        try:
            locked = _try_lock(fd)
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                os.close(fd)
                shutil.rmtree(directory, ignore_errors=True)
                raise
            locked = True
        if locked and _is_current(fd, directory / WRITER):
            break
        os.close(fd)  # a cleaner holds it, or removed it meanwhile: make another
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.close(fd)


def remove_stale(candidates: Iterable[Path]) -> None:
    """Remove the temporary directories whose writer is gone: those whose lock no process holds."""
    for stale in candidates:
        fd = _open_writer(stale)
        if fd is None:
            continue
        try:
            if _try_lock(fd):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                raise
        finally:
            os.close(fd)
