"""The official CIFAR-10-C / CIFAR-100-C files (Hendrycks & Dietterich 2019), fetched once.

    rift-ray data cifar10-c                  # -> <data root>/CIFAR-10-C/<corruption>.npy
    rift-ray data cifar100-c --root /data    # -> /data/CIFAR-100-C/

``<data root>`` is ``data.root``'s default (``$RIFT_DATA_ROOT``, else ``~/.cache/rift-ray/data``).
A sweep on ``data.dataset: cifar10`` / ``cifar100`` with ``eval.corruption_source: files``
reads ``<data.root>/CIFAR-10-C`` / ``CIFAR-100-C`` unless ``eval.cifar_c_root`` names another
directory (:func:`cifar_c_dir`). The tar is checked against the MD5 that Zenodo publishes for
it, its ``.npy`` files are extracted and the tar is deleted; ``.rift-ray-verified.json`` in the
directory records what was extracted, so a second run downloads nothing. No Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rift_ray.errors import DataError

if TYPE_CHECKING:
    from rift_ray.config import SweepConfig


@dataclass(frozen=True)
class Official:
    """One official corruption set: its Zenodo tar and the folder the tar holds."""

    name: str
    folder: str
    url: str
    md5: str
    """As Zenodo lists it for the file (records 2535967 and 3555552, version 1)."""


OFFICIAL: dict[str, Official] = {
    "cifar10-c": Official(
        "cifar10-c",
        "CIFAR-10-C",
        "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar?download=1",
        "56bf5dcef84df0e2308c6dcbcbbd8499",
    ),
    "cifar100-c": Official(
        "cifar100-c",
        "CIFAR-100-C",
        "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar?download=1",
        "11f0ed0f1191edbf9fa23466ae6021d3",
    ),
}
"""``rift-ray data <name>``: the official tars and their checksums."""
FOR_DATASET = {"cifar10": "cifar10-c", "cifar100": "cifar100-c"}
"""The official corruption set of each ``data.dataset`` that has one."""
MARKER = ".rift-ray-verified.json"
_CHUNK = 1 << 20


def default_root() -> Path:
    """Where ``rift-ray data`` puts a set without ``--root``: ``data.root``'s default."""
    from rift_ray.config import DataConfig
    from rift_ray.data import data_root

    return data_root(DataConfig())


def cifar_c_dir(cfg: SweepConfig) -> str | None:
    """The directory ``eval.corruption_source: files`` reads: ``eval.cifar_c_root``, else
    ``<data root>/CIFAR-10-C`` (cifar10) or ``CIFAR-100-C`` (cifar100); None for other datasets."""
    from rift_ray.config import expand_path
    from rift_ray.data import data_root

    if cfg.eval.cifar_c_root:
        return expand_path(cfg.eval.cifar_c_root)
    name = FOR_DATASET.get(cfg.data.dataset)
    return str(data_root(cfg.data) / OFFICIAL[name].folder) if name else None


def data_hint(cfg: SweepConfig) -> str:
    """What to run (``rift-ray data ...``) to put the official files where ``cfg`` reads them."""
    spec = OFFICIAL[FOR_DATASET.get(cfg.data.dataset, "cifar10-c")]
    where = cifar_c_dir(cfg)
    path = Path(where).expanduser() if where else None
    if path is None or path.name != spec.folder:
        return (
            f"run `rift-ray data {spec.name} --root DIR` and set "
            f"eval.cifar_c_root=DIR/{spec.folder}"
        )
    root = "" if path.parent == default_root() else f" --root {path.parent}"
    return f"run `rift-ray data {spec.name}{root}`"


def verified(folder: Path, md5: str) -> bool:
    """True when ``folder`` holds every file that a download checked against ``md5`` wrote."""
    try:
        mark = json.loads((folder / MARKER).read_text())
        files = mark["files"]
        return (
            mark.get("md5") == md5
            and "labels.npy" in files
            and all((folder / f).stat().st_size == n for f, n in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def fetch(
    name: str, root: str | Path | None = None, *, url: str | None = None, md5: str | None = None
) -> tuple[Path, bool]:
    """Download, check and extract the official set ``name`` (a key of :data:`OFFICIAL`) into
    ``<root>/<folder>``; ``(that directory, whether anything was downloaded)``.

    ``url`` / ``md5`` replace the official ones (a mirror; the tests' local server). A checksum
    mismatch or a failed download raises DataError (one line) and leaves no partial file.
    """
    from filelock import FileLock

    spec = OFFICIAL[name]
    url, md5 = url or spec.url, (md5 or spec.md5).lower()
    root = Path(root).expanduser() if root else default_root()
    dest = root / spec.folder
    if verified(dest, md5):
        return dest, False
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--root: cannot create {root}: {e.strerror or e}") from None
    with FileLock(str(root / f".{spec.folder}.lock")):
        if verified(dest, md5):  # another process finished it while this one waited
            return dest, False
        tar = root / f"{spec.folder}.tar.part"
        try:
            got = _download(url, tar, spec.folder)
            if got != md5:
                raise DataError(
                    f"{tar.name.removesuffix('.part')}: checksum mismatch (md5 expected {md5}, "
                    f"got {got}; downloaded from {url}); the partial file was removed"
                )
            _extract(tar, dest, spec.folder, url, md5)
        finally:
            tar.unlink(missing_ok=True)
    return dest, True


def _download(url: str, out: Path, label: str) -> str:
    """Stream ``url`` to ``out`` with a progress bar; the MD5 of what was written."""
    from rift_ray.progress import Progress

    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(out, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0)
            done = 0
            with Progress(f"download {label}", -(-size // _CHUNK), "MiB") as bar:
                while chunk := r.read(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    before, done = done, done + len(chunk)
                    bar.advance(done // _CHUNK - before // _CHUNK)
                bar.advance(1 if done % _CHUNK else 0)
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise DataError(f"downloading {url} failed: {why}") from None
    return h.hexdigest()


def _extract(tar: Path, dest: Path, folder: str, url: str, md5: str) -> None:
    """The ``<folder>/*.npy`` files of ``tar`` into ``dest``, then the marker. Only plain files
    directly under ``<folder>/`` are taken (no links, no paths that climb out)."""
    staging = dest.with_name(f".{folder}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: dict[str, int] = {}
    try:
        with tarfile.open(tar) as tf:
            for m in tf:
                top, _, base = m.name.removeprefix("./").partition("/")
                if not m.isfile() or top != folder or "/" in base or not base.endswith(".npy"):
                    continue
                src = tf.extractfile(m)
                assert src is not None
                with src, open(staging / base, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                files[base] = m.size
        if "labels.npy" not in files:
            raise DataError(f"{tar.name.removesuffix('.part')}: no {folder}/labels.npy inside")
        dest.mkdir(parents=True, exist_ok=True)
        for base in files:
            os.replace(staging / base, dest / base)
    except tarfile.TarError as e:
        raise DataError(f"{tar.name.removesuffix('.part')}: not a readable tar ({e})") from None
    except OSError as e:  # a full disk, say
        raise DataError(f"extracting into {dest} failed: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    mark: dict[str, Any] = {"source": url, "md5": md5, "files": files}
    (dest / MARKER).write_text(json.dumps(mark, indent=1) + "\n")
