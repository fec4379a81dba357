"""Tar archives of image folders, extracted once into a cache under a file lock, every member
checked before anything is written."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from rift_ray.errors import DataError

log = logging.getLogger(__name__)


def _check_member(member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    """Refuse a tar member that is absolute, has a ``..`` part, links outside ``target`` or is special."""
    name = member.name
    parts = Path(name).parts
    unsafe = name.startswith(("/", "\\")) or ".." in parts or ":" in (parts[0] if parts else "")
    if not unsafe and (member.issym() or member.islnk()):
        link = member.linkname
        base = target / Path(name).parent if member.issym() else target
        dest = Path(os.path.normpath(base / link))
        unsafe = os.path.isabs(link) or not dest.is_relative_to(target)
    if unsafe:
        raise DataError(
            f"{archive}: refusing archive member {name!r} (would write outside the extraction dir)"
        )
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DataError(f"{archive}: refusing archive member {name!r} (not a file or directory)")


def _extract_members(tf: tarfile.TarFile, dest: Path, archive: Path) -> None:
    """Check every member before writing anything, then extract (with the "data" filter if any)."""
    members = tf.getmembers()
    resolved = dest.resolve()
    for m in members:
        _check_member(m, resolved, archive)
    if hasattr(tarfile, "data_filter"):
        tf.extractall(dest, members=members, filter="data")
    else:  # Python without extraction filters: the checks above must do
        tf.extractall(dest, members=members)


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract a .tar/.tar.gz/.tgz once into ``cache_dir/extracted/<key>/`` and return that dir.

    ``key`` hashes the archive's path, size and mtime. Extraction goes to a temp dir that is
    renamed into place (marker file ``.complete`` inside), under a file lock, so concurrent
    callers extract once. Every member is checked before anything is written.
    """
    archive = archive.resolve()
    st = archive.stat()
    key = hashlib.sha256(f"{archive}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    parent = cache_dir / "extracted"
    target = parent / key
    if (target / ".complete").exists():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f"{key}.lock")):
        if (target / ".complete").exists():
            return target
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent))
        try:
            with tarfile.open(archive, "r:*") as tf:
                _extract_members(tf, tmp, archive)
            (tmp / ".complete").write_text(f"{archive}\n")
            if target.exists():  # left over without a marker: never complete
                shutil.rmtree(target)
            os.rename(tmp, target)
        except (tarfile.TarError, OSError, KeyError) as e:
            raise DataError(f"{archive}: cannot extract: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("extracted %s to %s in %.1fs", archive, target, time.perf_counter() - t0)
    return target
