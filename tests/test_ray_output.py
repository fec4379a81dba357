"""Ray's own output goes to the sweep's logs/ray.log (rift_ray.console.RayOutput), no Ray needed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rift_ray.console import RayOutput, ray_console
from rift_ray.store import Store


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_output_goes_to_the_log_file(tmp_path: Path, verbose: bool) -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp

    seen: list[dict] = []
    disp.add_handler("console", seen.append)  # what Ray's console printer stands for
    logger = logging.getLogger("ray")
    console = logging.StreamHandler()
    logger.addHandler(console)
    try:
        store = Store.open(str(tmp_path), "s")
        with RayOutput(store, verbose=verbose) as out:
            out.attach_workers()
            assert ray_console() is verbose  # Tune prints its own tables only with -v
            disp.emit({"pid": 42, "actor_name": "TrainController", "lines": ["Reporting result"]})
            logging.getLogger("ray.tune").warning("a Tune warning")
            assert (console in logger.handlers) is verbose
        assert ray_console() is True and console in logger.handlers  # restored
        assert [name for name, _ in disp.handlers].count("rift_ray_log_file") == 0
        log = (tmp_path / "s/logs/ray.log").read_text()
        assert "(TrainController pid=42) Reporting result" in log and "a Tune warning" in log
        assert len(seen) == (1 if verbose else 0)  # the console got it only with -v
    finally:
        disp.remove_handler("console")
        logger.removeHandler(console)


def test_a_refused_sweep_leaves_no_log_behind(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "s")
    with pytest.raises(RuntimeError):
        with RayOutput(store):
            raise RuntimeError("the bundles fit no node")  # before Ray ran anything
    assert not (tmp_path / "s").exists()
