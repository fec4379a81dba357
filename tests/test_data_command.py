"""`rift-ray data`: the official CIFAR-C tar fetched, checked and extracted where sweeps read it
(a tiny fake tar served from 127.0.0.1), the preflight error that names the command, and the
"regenerated" label on every corruption figure a sweep shows. No Ray, no network."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_report import fake_summary, make_sweep

from rift_ray import store as layout
from rift_ray.checks import check_corruptions
from rift_ray.cli import main, print_summary
from rift_ray.config import ConfigError, SweepConfig, load_config, to_yaml
from rift_ray.corruptions import load_cifar_c
from rift_ray.downloads import MARKER, cifar_c_dir
from rift_ray.report import render_html
from rift_ray.results import SweepResults, corruption_fields, summary_table

N = 4  # images per severity (the official files have 10,000)
REGENERATED = "corruption (regenerated, not the official CIFAR-10-C)"


def fake_cifar_c() -> tuple[bytes, dict[str, np.ndarray]]:
    """A CIFAR-10-C.tar in the official layout, scaled down: [5 * N, 32, 32, 3] uint8 per
    corruption plus labels.npy; also a member that climbs out, which must be skipped."""
    rng = np.random.default_rng(0)
    arrays = {
        "fog": rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8),
        "contrast": rng.integers(0, 256, (5 * N, 32, 32, 3), dtype=np.uint8),
        "labels": np.tile(np.arange(N, dtype=np.uint8), 5),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        members = {f"CIFAR-10-C/{k}.npy": v for k, v in arrays.items()} | {
            "../evil.npy": arrays["fog"]
        }
        for name, arr in members.items():
            data = io.BytesIO()
            np.save(data, arr)
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            tf.addfile(info, io.BytesIO(data.getvalue()))
    return buf.getvalue(), arrays


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    """The fake tar at ``url``; ``requests`` counts the GETs."""
    body, arrays = fake_cifar_c()
    state: dict[str, Any] = {"requests": 0, "arrays": arrays, "md5": hashlib.md5(body).hexdigest()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            state["requests"] += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/CIFAR-10-C.tar"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _cfg(*overrides: str) -> SweepConfig:
    return load_config(
        None, ["data.dataset=cifar10", "eval.corruptions=[fog,contrast]", *overrides]
    )


def test_data_lands_where_the_sweep_reads_and_downloads_once(
    server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("RIFT_DATA_ROOT", str(tmp_path))  # data.root's default
    before = server["requests"]
    args = ["data", "cifar10-c", "--url", server["url"], "--md5", server["md5"]]
    assert main(args) == 0
    assert "downloaded, checked (md5) and extracted" in capsys.readouterr().out
    cfg = _cfg()
    assert cifar_c_dir(cfg) == str(tmp_path / "CIFAR-10-C")
    check_corruptions(cfg)  # the preflight finds them
    cells = load_cifar_c(cifar_c_dir(cfg), ["fog", "contrast"], [1, 5], n_per_severity=N)
    fog5 = torch.from_numpy(server["arrays"]["fog"][4 * N :]).permute(0, 3, 1, 2)
    assert torch.equal(cells[("fog", 5)].images, fog5)
    assert cells[("contrast", 1)].labels.tolist() == list(range(N))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "CIFAR-10-C"
    ]  # no tar, no partial file, nothing outside the folder
    assert sorted(p.name for p in (tmp_path / "CIFAR-10-C").iterdir()) == sorted(
        [MARKER, "contrast.npy", "fog.npy", "labels.npy"]
    )
    assert main(args) == 0  # already there and verified: no second download
    assert "already in" in capsys.readouterr().out
    assert server["requests"] - before == 1


def test_wrong_checksum_is_one_line_and_leaves_nothing(
    server: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    code = main(
        ["data", "cifar10-c", "--root", str(tmp_path), "--url", server["url"], "--md5", "0" * 32]
    )
    *progress, err = capsys.readouterr().err.splitlines()
    assert code == 2 and all(line.startswith("[rift-ray] download") for line in progress)
    assert err.startswith("rift-ray: error: CIFAR-10-C.tar: checksum mismatch")
    assert f"expected {'0' * 32}" in err and f"got {server['md5']}" in err
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_files_name_the_data_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        check_corruptions(_cfg(f"data.root={tmp_path}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"eval.corruptions: {tmp_path}/CIFAR-10-C/")
    assert f"`rift-ray data cifar10-c --root {tmp_path}`" in msg
    assert "--set eval.corruption_source=generated" in msg
    check_corruptions(_cfg(f"data.root={tmp_path}", "eval.corruption_source=generated"))


@pytest.mark.parametrize("source", ["generated", "files"])
def test_regenerated_corruptions_are_labelled(
    source: str, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = SweepConfig.model_validate(
        {"name": "fake", "storage": str(tmp_path), "adv_train": {"epochs": 3},
         "eval": {"corruptions": ["fog"], "corruption_source": source}}
    )  # fmt: skip
    summary = {**fake_summary(), **corruption_fields(cfg)}
    regenerated = source == "generated"
    assert (summary["corruption_label"] == REGENERATED) is regenerated
    # tables/summary.parquet: the source of each row's corruption figure
    col = summary_table(summary).column("corruption_source").to_pylist()
    assert col == [None, source, None, source]  # val rows have no corruption figure
    # the printed summary
    monkeypatch.setenv("COLUMNS", "200")
    print_summary(summary)
    assert (REGENERATED in capsys.readouterr().out) is regenerated
    # the HTML report: the before/after table, a note up front, the figure captions
    store = make_sweep(tmp_path)
    store.put_text(layout.CONFIG, to_yaml(cfg))
    store.put_json(layout.SUMMARY, summary)
    html = render_html(SweepResults.load(store))
    assert html.count(REGENERATED) >= (4 if regenerated else 0)
    assert ("regenerated by rift-ray" in html) is regenerated
    # a summary written before labels: the report reads the source from the config
    store.put_json(layout.SUMMARY, fake_summary())
    assert (REGENERATED in render_html(SweepResults.load(store))) is regenerated
