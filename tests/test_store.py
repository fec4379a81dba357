"""Storage layout: atomic artifacts with checksums, stage records, non-local filesystems."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from rift_ray.store import MRC_TABLE, StorageError, Store


def test_put_get_and_checksums(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "s")
    store.put("artifacts/x.bin", b"hello", stage_hash="h1")
    assert store.get("artifacts/x.bin") == b"hello"
    assert store.valid("artifacts/x.bin", "h1") and not store.valid("artifacts/x.bin", "h2")
    (tmp_path / "s/artifacts/x.bin").write_bytes(b"hellO")  # corrupted behind our back
    assert not store.valid("artifacts/x.bin")
    with pytest.raises(StorageError, match="checksum"):
        store.get("artifacts/x.bin")
    assert not list((tmp_path / "s/artifacts").glob("*.tmp-*"))  # no temp files left


def test_stage_done_requires_hash_and_valid_artifacts(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "s")
    store.put_table(MRC_TABLE, [{"module": "conv1", "mrc": 0.1}], stage_hash="h")
    assert not store.stage_done("mrc", "h")  # no record yet
    store.write_stage("mrc", status="done", hash="h")
    assert store.stage_done("mrc", "h")
    assert not store.stage_done("mrc", "other")
    (tmp_path / "s" / MRC_TABLE).write_bytes(b"truncated")
    assert not store.stage_done("mrc", "h")
    assert store.read_stage("finetune") is None


def test_tables_round_trip(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "s")
    rows = [
        {"module": "a", "mrc": 0.5, "status": "done"},
        {"module": "b", "mrc": None, "status": "failed"},
    ]
    store.put_table("tables/t.parquet", rows)
    assert store.get_table("tables/t.parquet").to_pylist() == rows


def test_object_store_path(tmp_path: Path) -> None:
    """A non-local pyarrow filesystem takes the single-PUT path (as s3:// or gs:// would)."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = Store(fs, "bucket/s", "mock://bucket/s")
    assert not store.is_local
    store.check_writable()
    store.put_json("summary.json", {"alpha": 0.7})
    assert store.get_json("summary.json") == {"alpha": 0.7}
    assert (tmp_path / "bucket/s/summary.json").is_file()
    path, sfs = store.ray_storage()
    assert path == "bucket/s/ray" and sfs is fs


def test_unwritable_storage(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the storage directory should be")
    store = Store.open(str(blocker), "s")
    with pytest.raises(StorageError, match="not writable"):
        store.check_writable()


def test_bad_uri() -> None:
    with pytest.raises(StorageError, match="storage"):
        Store.open("nosuchscheme://x/y", "s")
