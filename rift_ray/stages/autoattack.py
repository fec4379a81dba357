"""AutoAttack of one model, sharded by image across Ray tasks and resumable.

The first ``eval.autoattack.subset`` test images are cut into shards of ``shard_size``;
one Ray task attacks each shard (:func:`rift_ray.autoattack.autoattack_accuracy`). The
driver writes every shard's result to ``artifacts/autoattack/<name>/shard-<i>.json`` as
soon as it arrives, tagged with a key hashing the weights, the images and the attack
settings; a re-run reuses every shard whose file verifies against that key and only
computes the rest.

    res = run_autoattack(cfg, store, spec, splits_ref, rift_state, "rift")
    res["robust_acc"]  # percent over res["n"] images
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any

import ray
import torch

from rift_ray.autoattack import ATTACKS, IMPLEMENTATION, autoattack_accuracy
from rift_ray.config import SweepConfig, TrialResources
from rift_ray.data import DatasetSplits, ImageData
from rift_ray.stages.common import ModelSpec, start_worker
from rift_ray.store import Store, autoattack_shard


def _images(data: DatasetSplits | ImageData, subset: int | None) -> ImageData:
    """The attacked images: the test split of ``data`` (or ``data`` itself), first ``subset``."""
    images = data.test if isinstance(data, DatasetSplits) else data
    if subset is not None and len(images) > subset:
        images = images.subset(torch.arange(subset))
    return images


def _key(state: dict[str, torch.Tensor], data: ImageData, settings: dict[str, Any]) -> str:
    """What a shard's result depends on: weights, images, labels and attack settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    return h.hexdigest()[:16]


@ray.remote
def _shard_task(
    cfg_dict: dict[str, Any],
    spec: ModelSpec,
    data: DatasetSplits | ImageData,
    state: dict[str, torch.Tensor],
    start: int,
    stop: int,
    settings: dict[str, Any],
    cpus: float,
    state_path: str,
) -> dict[str, Any]:
    _cfg, device, model = start_worker(cfg_dict, cpus, spec, state, compute=False)
    os.makedirs(os.path.dirname(state_path), exist_ok=True)
    shard = _images(data, settings["subset"]).subset(torch.arange(start, stop))
    t0 = time.time()
    res = autoattack_accuracy(
        model,
        shard,
        eps=settings["eps"],
        version=settings["version"],
        batch_size=settings["batch_size"],
        device=device,
        seed=settings["seed"],
        n_classes=spec.num_classes,
        steps=settings["steps"],
        n_queries=settings["n_queries"],
        state_path=state_path,
    )
    with contextlib.suppress(OSError):  # done: the result goes to the store now
        os.remove(state_path)
    n = res["n"]
    return {
        "start": start,
        "stop": stop,
        "n": n,
        "robust": int(res["correct_mask"].sum()),
        "clean": int(res["clean_mask"].sum()),
        "after": {k: round(v * n / 100) for k, v in res["after"].items()},
        "correct_mask": [int(b) for b in res["correct_mask"]],
        "seconds": time.time() - t0,
    }


def run_autoattack(
    cfg: SweepConfig,
    store: Store,
    spec: ModelSpec,
    splits_ref_or_data: Any,
    state_dict: dict[str, torch.Tensor],
    name: str,
    *,
    shard_size: int | None = None,
    resources: TrialResources | None = None,
    steps: int | None = None,
    n_queries: int | None = None,
) -> dict[str, Any]:
    """AutoAttack robust accuracy of ``state_dict`` on the test images, sharded and resumable.

    ``splits_ref_or_data``: a ``DatasetSplits`` (its test split is attacked), an
    ``ImageData``, or a Ray ObjectRef to either. ``name`` names the shard directory (e.g.
    ``"at"``, ``"rift"``). ``shard_size`` defaults to ``eval.autoattack.shard_size``,
    ``resources`` to ``resources.interpolate``; ``steps`` / ``n_queries`` shrink the attack
    for tests only (recorded in the result). Within a shard, batches are
    ``min(eval.batch_size, shard_size)`` images.

    Returns ``robust_acc``, ``clean_acc`` (percent), ``n``, ``after`` (robust accuracy
    after each attack), ``correct_mask`` (list of 0/1 per image), ``shards``, ``computed``
    (shards attacked by this call), ``reused`` and the attack ``settings``.
    """
    return run_autoattack_points(
        cfg,
        store,
        spec,
        splits_ref_or_data,
        {name: state_dict},
        shard_size=shard_size,
        resources=resources,
        steps=steps,
        n_queries=n_queries,
    )[name]


def run_autoattack_points(
    cfg: SweepConfig,
    store: Store,
    spec: ModelSpec,
    splits_ref_or_data: Any,
    points: dict[str, dict[str, torch.Tensor]],
    *,
    shard_size: int | None = None,
    resources: TrialResources | None = None,
    steps: int | None = None,
    n_queries: int | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`run_autoattack` for several models (``name -> state_dict``) at once: the shards
    of every model are submitted together, so they share the cluster's slots."""
    ac = cfg.eval.autoattack
    shard_size = shard_size or ac.shard_size
    r = resources or cfg.resources.interpolate
    data_ref = (
        splits_ref_or_data
        if isinstance(splits_ref_or_data, ray.ObjectRef)
        else ray.put(splits_ref_or_data)
    )
    images = _images(ray.get(data_ref), ac.subset)
    n = len(images)
    if n == 0:
        raise ValueError("run_autoattack: no test images")
    settings = {
        "version": ac.version,
        "eps": cfg.attack.eps,
        "seed": cfg.seed,
        "subset": ac.subset,
        "batch_size": min(cfg.eval.batch_size, shard_size),
        "shard_size": shard_size,
        "steps": steps,
        "n_queries": n_queries,
        "implementation": IMPLEMENTATION,
    }
    bounds = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    cfg_dict = cfg.to_dict()
    opts = {"num_cpus": r.cpu, "num_gpus": r.gpu}
    keys: dict[str, str] = {}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    todo: dict[str, list[int]] = {}
    jobs: dict[Any, tuple[str, int]] = {}
    for name, state_dict in points.items():
        keys[name] = key = _key(state_dict, images, settings)
        results[name] = _stored_shards(store, name, key, len(bounds))
        todo[name] = [i for i in range(len(bounds)) if i not in results[name]]
        if not todo[name]:
            continue
        state_ref = ray.put(state_dict)
        for i in todo[name]:
            ref = _shard_task.options(**opts).remote(
                cfg_dict, spec, data_ref, state_ref, *bounds[i], settings, r.cpu,
                shard_state_path(store, name, i, key),
            )  # fmt: skip
            jobs[ref] = (name, i)
    pending = list(jobs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            name, i = jobs[ref]
            results[name][i] = ray.get(ref) | {"key": keys[name]}
            store.put_json(autoattack_shard(name, i), results[name][i], stage_hash=keys[name])
            print(
                f"[autoattack:{name}] {len(results[name])}/{len(bounds)} shards done",
                file=sys.stderr,
                flush=True,
            )
    return {
        name: _combined([results[name][i] for i in range(len(bounds))], len(todo[name]), settings)
        for name in points
    }


def shard_state_path(store: Store, name: str, i: int, key: str) -> str:
    """Where the shard's official evaluation state lives while it runs: beside its result in
    local (or shared) storage, so a retried task resumes inside the attack sequence; with
    object storage on the worker's own disk (a retry on the same node resumes, another node
    starts the shard over)."""
    rel = f"{autoattack_shard(name, i)[: -len('.json')]}.state-{key}.json"
    if store.is_local:
        return store.path(rel)
    return os.path.join(
        tempfile.gettempdir(), "rift-ray-autoattack", store.uri.replace("/", "_"), rel
    )


def _stored_shards(store: Store, name: str, key: str, count: int) -> dict[int, dict[str, Any]]:
    """The shards of ``name`` already in the store for exactly this model, data and settings."""
    return {
        i: store.get_json(autoattack_shard(name, i))
        for i in range(count)
        if store.valid(autoattack_shard(name, i), key)
    }


def _combined(
    rows: list[dict[str, Any]], computed: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """One model's AutoAttack result from its shards (accuracies in percent)."""
    n = sum(s["n"] for s in rows)
    return {
        "robust_acc": 100.0 * sum(s["robust"] for s in rows) / n,
        "clean_acc": 100.0 * sum(s["clean"] for s in rows) / n,
        "n": n,
        # after each attack: known when every shard ran it in one go (a resumed shard
        # reports only the attacks it ran after resuming)
        "after": {
            a: 100.0 * sum(s["after"][a] for s in rows) / n
            for a in ATTACKS
            if all(a in s["after"] for s in rows)
        },  # fmt: skip
        "correct_mask": [b for s in rows for b in s["correct_mask"]],
        "shards": len(rows),
        "computed": computed,
        "reused": len(rows) - computed,
        "settings": settings,
    }


def autoattack_curve(
    cfg: SweepConfig,
    store: Store,
    spec: ModelSpec,
    splits_ref: Any,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor],
    alpha_star: float,
    trial: str,
) -> dict[float, dict[str, Any]]:
    """AutoAttack at alpha 0 (the AT model, shards under ``at/``), alpha* (``rift/``) and every
    ``eval.autoattack.alphas`` point of the winning trial (``<trial>-alpha<a>/``): alpha -> result."""
    from rift_ray.rift import interpolate

    names = {0.0: "at"}
    names.setdefault(float(alpha_star), "rift")  # alpha* = 0 is the AT model: attacked once
    for a in cfg.eval.autoattack.alphas:
        names.setdefault(float(a), f"{trial}-alpha{a:g}")
    points = {
        name: at_state if alpha == 0.0 else interpolate(at_state, ft_state, alpha)
        for alpha, name in sorted(names.items())
    }
    results = run_autoattack_points(cfg, store, spec, splits_ref, points)
    return {alpha: results[name] for alpha, name in sorted(names.items())}
