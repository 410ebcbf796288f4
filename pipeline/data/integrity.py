"""Outputs a killed job cannot half-write, and inputs a stage can prove intact.

- `atomic_output`: write under a temporary name in the same directory, fsync every file, rename into
  place, fsync the directory. A kill at any point leaves either the old state or the complete new one.
- Records (JSON files a stage writes: manifests, metrics, summaries, scores) carry a `checksum` of
  their own content, so a truncated or edited record is refused by `read_record`.
- Each stage's record lists the data files it wrote (`files`: name relative to the record's directory
  -> bytes and sha256); consumers call `verify_files` before trusting them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..common import StageError
from .locks import locked_directory, remove_stale

CHECKSUM_KEY = "checksum"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


# ---- atomic output -----------------------------------------------------------------------------

def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under `path`, to disk."""
    paths = [path] if path.is_file() else [*sorted(path.rglob("*")), path]
    for item in paths:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; fsync it and rename it into place only if the block succeeds.

    A killed or failed stage never leaves a file or directory under the final name, and a full disk
    becomes a StageError naming the output. The temporary is locked while its writer lives: another
    writer removes only the leftovers of writers that are gone (pipeline/data/locks.py)."""
    path = Path(path)
    with contextlib.ExitStack() as temporary:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
            tmp = temporary.enter_context(locked_directory(
                lambda: tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)))
        except OSError as err:
            raise disk_full_error(err, path) or err from None
        target = tmp / path.name
        try:
            yield target
            fsync_tree(target)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(target, path)
            fsync_directory(path.parent)
        except Exception as err:
            full = disk_full_error(err, path)
            if full is None:
                raise
            raise full from None


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def disk_full_error(err: BaseException, path: Path) -> StageError | None:
    """A clear StageError when `err` is a full disk or quota (from Python, arrow, zarr or safetensors)."""
    full = getattr(err, "errno", None) in DISK_FULL or "No space left on device" in str(err) \
        or "Disk quota exceeded" in str(err)
    if not full:
        return None
    return StageError(f"no space left on the device while writing {path}; nothing was written under that "
                      f"name (free space and rerun)", transient=True)


# ---- checksums and records ---------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def write_json(path: str | Path, obj: Any) -> None:
    """Plain JSON, written atomically (for data files a record lists)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_record(path: str | Path, obj: dict) -> None:
    """Write a JSON record with the checksum of its content."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    body[CHECKSUM_KEY] = hashlib.sha256(_canonical(body)).hexdigest()
    write_json(path, body)


def read_record(path: str | Path) -> dict:
    """A record written by write_record (its checksum included); StageError naming the file if it is
    missing, truncated or altered."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path} does not exist; rerun the stage that writes it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(f"{path} is truncated or not JSON ({err}); rerun the stage that writes it") from None
    if not isinstance(obj, dict) or CHECKSUM_KEY not in obj:
        raise StageError(f"{path} has no checksum; it was not written by this pipeline's stage")
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    if hashlib.sha256(_canonical(body)).hexdigest() != obj[CHECKSUM_KEY]:
        raise StageError(f"{path} was modified after it was written (checksum mismatch); rerun its stage")
    return obj


# ---- manifests of data files -------------------------------------------------------------------

def file_entries(base: str | Path, paths: Iterable[str | Path]) -> dict[str, dict]:
    """{path relative to base: {bytes, sha256}} for files, and for every file under directories."""
    base = Path(base)
    entries = {}
    for item in map(Path, paths):
        files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for file in files:
            entries[file.relative_to(base).as_posix()] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return entries


def read_verified(record_path: str | Path, paths: Iterable[str | Path] = ()) -> dict:
    """Read a stage's record and verify the listed `paths` against it; return the record."""
    record = read_record(record_path)
    verify_files(record_path, record, paths)
    return record


def verify_files(record_path: str | Path, record: dict, paths: Iterable[str | Path]) -> None:
    """Check that the files (or directories) in `paths` are exactly what the record lists for them. The files
    are hashed hash_threads() at a time (a student reads 1.3 TB of targets at paper scale); the error is the
    first file's in the record's order, whichever thread found it."""
    base = Path(record_path).parent
    listed = record.get("files", {})
    checks = []
    for item in map(Path, paths):
        name = _relative(item, base)
        expected = {k: v for k, v in listed.items() if k == name or k.startswith(name + "/")}
        if not expected:
            raise StageError(f"{item} is not listed in {record_path}; the inputs are from different runs")
        checks += [(base / rel, entry, record_path, base / rel.split("/")[0]) for rel, entry in expected.items()]
    if len(checks) < 2:
        for check in checks:
            _verify_file(*check)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(hash_threads()) as pool:
        list(pool.map(lambda check: _verify_file(*check), checks))


def hash_threads() -> int:
    """Files hashed at a time: the cores Snakemake granted the job (OMP_NUM_THREADS), or this machine's, at most 8
    (sha256 releases the GIL; past a few threads the disk is the limit)."""
    granted = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    return max(1, min(8, granted or os.cpu_count() or 1))


def _relative(item: Path, base: Path) -> str:
    try:
        return item.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        raise StageError(f"{item} lies outside {base}, which holds its manifest") from None


def repair_hint(output: Path) -> str:
    """How a user gets an output written again: rerun the job that writes it (and what reads it)."""
    return f"rerun the job that writes it: snakemake --forcerun {output} (or delete {output} and rerun snakemake)"


def _verify_file(file: Path, entry: dict, record_path, output: Path) -> None:
    if not file.is_file():
        raise StageError(f"{file} is missing (listed in {record_path}); {repair_hint(output)}")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise StageError(f"{file} is truncated or altered: {size} bytes, {entry['bytes']} expected "
                         f"(from {record_path}); {repair_hint(output)}")
    if sha256_file(file) != entry["sha256"]:
        raise StageError(f"{file} is corrupt: its sha256 differs from {record_path}; {repair_hint(output)}")
