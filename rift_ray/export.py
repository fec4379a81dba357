"""``rift-ray export``: a finished sweep's final model as a file others load, with a model card.

    res = export_sweep("results/smoke", "safetensors")   # results/smoke/export/model.safetensors
    res.path, res.card_json, res.card_md                  # and model.card.json / model.card.md

The model is ``checkpoints/rift.pt``, the one ``summary.json`` describes (its trial and
alpha* are checked against the checkpoint's metadata). Two formats:

- ``safetensors``: the state dict in a ``.safetensors`` file (the ``safetensors`` package),
  with the architecture, classes and normalization as string metadata;
- ``robustbench``: a bare ``{name: tensor}`` state dict in a ``.pt`` file. RobustBench's
  ``load_model`` reads ``checkpoint["state_dict"]`` or, failing that, the file itself as the
  state dict, and strips ``module.`` / ``model.``: a bare dict without those prefixes loads
  as it is; ``torch.load(weights_only=True)`` reads it, and so does ``adv_train.checkpoint``.

Both hold exactly the tensors of ``rift_ray.models.build_model(arch, num_classes)``'s
state dict: the model takes images in [0, 1] and normalizes them itself (its
``normalize.mean`` / ``normalize.std`` buffers, written in the file). The card
(``<stem>.card.json`` and ``.md``) gives the threat model, the evaluation protocol, every
figure of ``summary.json`` (AT and RiFT, val and test), alpha*, the modules and lr, the
config hash, the versions and a three-line loader. Sweeps on ``s3://`` / ``gs://`` storage
are read and (by default) written to through :class:`rift_ray.store.Store`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import torch

from rift_ray.config import ConfigError
from rift_ray.metrics import METRICS
from rift_ray.store import CONFIG, RIFT_CHECKPOINT, SUMMARY, StorageError, Store

Format = Literal["safetensors", "robustbench"]
FORMATS: tuple[Format, ...] = ("safetensors", "robustbench")
SUFFIXES: dict[str, str] = {"safetensors": ".safetensors", "robustbench": ".pt"}
EXPORT_DIR = "export"


@dataclass(frozen=True)
class Exported:
    """Where the model and its card went (paths or URIs), and the card itself."""

    path: str
    card_json: str
    card_md: str
    card: dict[str, Any]
    size: int
    """The exported file's bytes."""


def export_sweep(sweep_dir: str, fmt: str, output: str | None = None) -> Exported:
    """Write the final model of the sweep at ``sweep_dir`` as ``fmt`` (:data:`FORMATS`) to
    ``output`` (default ``<sweep>/export/model.safetensors`` or ``model.pt``) and its card
    beside it. StorageError for a sweep that has no final model; ConfigError for a bad format."""
    from rift_ray.results import open_sweep

    if fmt not in FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)} (got {fmt!r})")
    store = open_sweep(sweep_dir)
    if output and (output.endswith("/") or Path(output).expanduser().is_dir()):
        output = f"{output.rstrip('/')}/model{SUFFIXES[fmt]}"
    summary = finished_summary(store)
    state, meta = final_model(store, summary)
    config = sweep_config(store)
    data = encode(fmt, state, meta)
    name = Path(output).name if output else f"model{SUFFIXES[fmt]}"
    card = model_card(summary, config, meta, fmt=fmt, file=name, data=data, sweep=store.uri)
    stem = name[: -len(SUFFIXES[fmt])] if name.endswith(SUFFIXES[fmt]) else Path(name).stem
    if output is None:
        where = f"{store.uri}/{EXPORT_DIR}"
        dest = Store(store.fs, f"{store.root}/{EXPORT_DIR}", where)
    else:
        where = output.rstrip("/").rsplit("/", 1)[0] if "/" in output else "."
        parent, _, leaf = where.rstrip("/").rpartition("/")
        dest = Store.open(parent or ".", leaf)  # a local path or an s3:// / gs:// URI
    card = merged_card(card, dest.read_json_file(f"{stem}.card.json"))
    texts = {".card.json": json.dumps(card, indent=1) + "\n", ".card.md": card_markdown(card)}
    files = {name: data, **{f"{stem}{ext}": text.encode() for ext, text in texts.items()}}
    for rel, blob in files.items():
        try:
            dest.write_file(rel, blob)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"-o: {dest.uri}/{rel}: {' '.join(str(e).split())}") from None
    return Exported(
        f"{where}/{name}", f"{where}/{stem}.card.json", f"{where}/{stem}.card.md", card, len(data)
    )


def merged_card(card: dict[str, Any], old: Any) -> dict[str, Any]:
    """``card``, listing too the other files of an existing card of the same stem when that
    card describes the same model (``model.safetensors`` and ``model.pt`` share ``model.card.*``)."""
    same = isinstance(old, dict) and all(
        old.get(k) == card[k] for k in ("config_hash", "rift", "sweep")
    )
    if same:
        names = {f["file"] for f in card["files"]}
        kept = [
            f for f in old.get("files") or [] if isinstance(f, dict) and f.get("file") not in names
        ]
        card = card | {"files": kept + card["files"]}
    return card


def finished_summary(store: Store) -> dict[str, Any]:
    """The sweep's ``summary.json``; StorageError (one line) when the sweep has no final model
    (not finished, or a ``seeds`` sweep, which has one per seed)."""
    from rift_ray.aggregate import is_seeds_summary

    if not store.exists(SUMMARY):
        raise StorageError(
            f"{store.uri}: no final model yet (summary.json and checkpoints/rift.pt are written "
            f"when stage 4 ends); rift-ray status {store.uri} says where it stands"
        )
    summary = store.get_json(SUMMARY)
    if is_seeds_summary(summary):
        seeds = ", ".join(str(s) for s in store.seed_dirs())
        raise StorageError(
            f"{store.uri}: a seeds sweep has one final model per seed: export "
            f"{store.uri}/seeds/<seed> (seeds: {seeds or 'none'})"
        )
    if not store.exists(RIFT_CHECKPOINT):
        raise StorageError(f"{store.uri}: summary.json but no {RIFT_CHECKPOINT}")
    return dict(summary)


def final_model(
    store: Store, summary: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, metadata) of ``checkpoints/rift.pt``, checked against the manifest and against
    ``summary.json`` (the same trial and alpha*, the same config hash)."""
    from rift_ray.checkpoint import load_checkpoint

    state, meta = load_checkpoint(io.BytesIO(store.get(RIFT_CHECKPOINT)), map_location="cpu")
    extra = meta.get("extra") or {}
    mine = (extra.get("trial"), extra.get("alpha"), meta.get("config_hash"))
    want = (summary.get("trial"), summary.get("alpha"), summary.get("config_hash"))
    if any(m is not None and m != w for m, w in zip(mine, want)):
        raise StorageError(
            f"{store.uri}/{RIFT_CHECKPOINT}: trial {mine[0]}, alpha {mine[1]}, config "
            f"{mine[2]}, but summary.json's final model is trial {want[0]}, alpha {want[1]}, "
            f"config {want[2]}: rerun the sweep to make them agree"
        )
    # the normalization the model applies: its buffers (what the file holds), not a label
    for k in ("mean", "std"):
        if f"normalize.{k}" in state:
            meta[k] = [round(float(v), 8) for v in state[f"normalize.{k}"].flatten()]
    return {k: v.contiguous() for k, v in state.items()}, meta


def sweep_config(store: Store) -> dict[str, Any]:
    """The sweep's ``config.yaml`` (a seed's directory ``seeds/<s>``: the sweep's, above it)."""
    import yaml

    for candidate in (store, _parent_sweep(store)):
        if candidate is not None and candidate.exists(CONFIG):
            return dict(yaml.safe_load(candidate.read_bytes(CONFIG)) or {})
    raise StorageError(f"{store.uri}: no config.yaml (nor in the sweep above a seed directory)")


def _parent_sweep(store: Store) -> Store | None:
    parts = store.root.rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "seeds" and parts[2].isdigit():
        return Store(store.fs, parts[0], store.uri.rsplit("/", 2)[0])
    return None


def encode(fmt: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The file's bytes: safetensors (with string metadata) or a bare torch state dict."""
    if fmt == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise ConfigError(
                "--format safetensors: needs the package safetensors (pip install safetensors)"
            ) from None
        info = {k: meta.get(k) for k in ("arch", "num_classes", "dataset", "mean", "std")}
        info |= {k: (meta.get("extra") or {}).get(k) for k in ("trial", "alpha")}
        info["config_hash"] = meta.get("config_hash")
        return bytes(save(state, metadata={k: json.dumps(v) for k, v in info.items()}))
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def eps_text(eps: float) -> str:
    """``8/255`` where eps is a whole number of 255ths, else the number."""
    k = round(eps * 255)
    return f"{k}/255" if k and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def model_card(
    summary: dict[str, Any],
    config: dict[str, Any],
    meta: dict[str, Any],
    *,
    fmt: str,
    file: str,
    data: bytes,
    sweep: str,
) -> dict[str, Any]:
    """What a user of the exported file needs to know, as one JSON-able dict."""
    from rift_ray import __version__

    model_cfg, attack, ev = (
        config.get("model", {}),
        config.get("attack", {}),
        config.get("eval", {}),
    )
    arch, classes = meta.get("arch") or model_cfg.get("arch"), int(meta["num_classes"])
    model: dict[str, Any] = {"arch": arch, "num_classes": classes, "dataset": meta.get("dataset")}
    if arch == "wrn":
        model |= {"depth": model_cfg.get("depth"), "widen_factor": model_cfg.get("widen_factor")}
    model["input"] = "images in [0, 1], [B, C, H, W]; the model normalizes them itself"
    model["normalization"] = {"mean": meta.get("mean"), "std": meta.get("std"),
                              "buffers": ["normalize.mean", "normalize.std"]}  # fmt: skip
    paired = summary.get("paired") or {}
    aa = summary.get("autoattack") or {}
    corr = ev.get("corruptions") or []
    protocol = {
        "val": "the sweep's validation split (data.val_size training images held out with "
        f"seed {config.get('seed')}), first eval.val_subset images",
        "val_subset": ev.get("val_subset"),
        "test_subset": ev.get("test_subset"),
        "n": {s: (paired.get(s) or {}).get("clean_acc", {}).get("n") for s in ("val", "test")},
        "restarts": ev.get("restarts"),
        "batch_size": ev.get("batch_size"),
        "seed": summary.get("seed"),
        "alpha_rule": summary.get("rule", "paper"),
        "tolerance": (config.get("interpolate") or {}).get("tolerance"),
        "corruptions": {
            "names": corr,
            "severities": ev.get("severities"),
            "source": summary.get("corruption_source"),
            "label": summary.get("corruption_label"),
        }
        if corr
        else None,  # fmt: skip
        "autoattack": next((a["settings"] | {"n": a["n"]} for a in aa.values()), None),
    }
    return {
        "files": [
            {
                "format": fmt,
                "file": file,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "load": load_snippet(fmt, file, model),
            }
        ],
        "sweep": {
            "name": summary.get("name"),
            "uri": sweep,
            "config_hash": summary.get("config_hash"),
        },
        "model": model,
        "threat_model": {
            "norm": "Linf",
            "eps": attack.get("eps"),
            "eps_text": eps_text(float(attack.get("eps", 0.0))),
            "attack": "PGD",
            "steps": attack.get("steps"),
            "step_size": attack.get("step_size"),
            "random_start": attack.get("random_start"),
        },
        "protocol": protocol,
        "results": {
            who: {
                s: {k: v for k, v in (summary.get(who) or {}).get(s, {}).items() if k in METRICS}
                for s in ("val", "test")
            }
            for who in ("at", "rift")
        },  # fmt: skip
        "rift": {k: summary.get(k) for k in ("alpha", "modules", "lr", "trial", "reason")},
        "config_hash": summary.get("config_hash"),
        "versions": {"exported_with": __version__, "sweep": summary.get("versions")},
    }


def load_snippet(fmt: str, file: str, model: dict[str, Any]) -> str:
    """Three lines that load the exported file into a model of the right shape."""
    args = [json.dumps(model["arch"]), str(model["num_classes"])]
    if model["arch"] == "wrn":
        args += [f"depth={model['depth']}", f"widen_factor={model['widen_factor']}"]
    channels = len(model["normalization"]["mean"] or [0, 0, 0])
    if channels != 3:  # build_model takes the input channels from mean/std's length
        args += [f"mean=[0.5]*{channels}", f"std=[0.5]*{channels}"]
    if fmt == "safetensors":
        head, load = "from safetensors.torch import load_file", f"load_file({json.dumps(file)})"
    else:
        head, load = "import torch", f"torch.load({json.dumps(file)}, weights_only=True)"
    return (
        f"{head}\nfrom rift_ray.models import build_model\n"
        f"model = build_model({', '.join(args)}); model.load_state_dict({load}); model.eval()"
    )


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: what the model is, how it was measured, its figures, how to load it."""
    m, t, p, r = card["model"], card["threat_model"], card["protocol"], card["rift"]
    results = card["results"]
    keys = [k for k in METRICS if any(k in sp for who in results.values() for sp in who.values())]
    table = [f"| model | split | {' | '.join(METRICS[k] for k in keys)} |",
             "|---|---|" + "---:|" * len(keys)]  # fmt: skip
    for who, label in (("at", "AT"), ("rift", "RiFT")):
        for split in ("val", "test"):
            got = results[who][split]
            cells = ["-" if got.get(k) is None else f"{got[k]:.2f}" for k in keys]
            table.append(f"| {label} | {split} | {' | '.join(cells)} |")
    wrn = (
        f" (depth {m.get('depth')}, widen factor {m.get('widen_factor')})"
        if m["arch"] == "wrn"
        else ""
    )
    norm, aa, c = m["normalization"], p["autoattack"], p["corruptions"]
    start = "random start" if t["random_start"] else "no random start"
    lines = [
        f"# {card['sweep']['name']}: RiFT model ({m['arch']}, {m['dataset']})",
        "",
        f"- architecture: `{m['arch']}`{wrn}, {m['num_classes']} classes",
        f"- input: {m['input']} (mean {norm['mean']}, std {norm['std']}; buffers "
        "`normalize.mean`, `normalize.std`)",
        f"- threat model: L-inf, eps {t['eps_text']}; PGD-{t['steps']}, step "
        f"{eps_text(float(t['step_size']))}, {start}, {p['restarts']} restart(s) (per-image worst)",
        f"- protocol: val n={p['n']['val']}, test n={p['n']['test']} (eval.val_subset "
        f"{p['val_subset'] or 'all'}, test_subset {p['test_subset'] or 'all'}), seed {p['seed']}",
        f"- RiFT: modules {', '.join(r['modules'] or [])}, lr {r['lr']}, alpha* {r['alpha']} "
        f"(rule {p['alpha_rule']}, tolerance {p['tolerance']}): {r['reason']}",
    ]
    if c:
        lines.append(f"- corruptions: {', '.join(c['names'])}, severities {c['severities']}: "
                     f"{c['label'] or c['source']}")  # fmt: skip
    if aa:
        lines.append(f"- AutoAttack: {aa.get('version')}, {aa.get('implementation')}, first "
                     f"{aa['n']} test images")  # fmt: skip
    versions = card["versions"]
    lines += [
        f"- sweep `{card['sweep']['uri']}`, config hash `{card['config_hash']}`; exported with "
        f"rift-ray {versions['exported_with']} (the sweep ran "
        f"{(versions['sweep'] or {}).get('rift_ray')})",
        "",
        "## Accuracy (%)",
        "",
        *table,
        "",
    ]
    for f in card["files"]:
        lines += [
            f"## `{f['file']}` ({f['format']})",
            "",
            f"{f['bytes']} bytes, sha256 `{f['sha256']}`",
            "",
            "```python",
            f["load"],
            "```",
            "",
        ]
    return "\n".join(lines)


__all__ = ["FORMATS", "Exported", "export_sweep", "model_card"]
