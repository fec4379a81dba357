"""cluster.yaml passes Ray's own autoscaler schema validation (no cloud calls)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # no trials on the head
    assert "InstanceType" in types["gpu_worker"]["node_config"]
    assert any("pip install" in c and "rift-ray" in c for c in cfg["setup_commands"])
