"""Stage 4: several interpolation alphas in one batched forward (``torch.vmap``) vs one model per alpha.

    nice python -m benchmarks.multi_alpha_bench        # 1.5 to 4 min on a shared 2-core CPU

For K alphas (2, 4, 6), the weights ``(1 - alpha) * theta_AT + alpha * theta_FT`` of
small_resnet (the ``sweeps/cifar10-cpu.yaml`` model) are evaluated two ways on random
CIFAR-shaped images (seeded; no dataset needed, timing does not depend on the data), 2 torch
threads, eval batch 500 (the config's; PGD's batch is then all M = 200 images):

- **sequential** (what stage 4 does): per alpha, ``interpolate`` the state dict, load it into
  the model, a clean forward of N images in eval batches, and PGD-10 (eps 8/255, step 2/255,
  ``rift_ray.attacks.pgd_attack``, random start seeded per alpha as ``evaluate`` does) on M
  images plus the forward on the adversarial images;
- **vmap**: the K interpolated parameter and buffer dicts stacked, one
  ``vmap(functional_call(model, (params, buffers), x))`` per batch (the images shared,
  ``in_dims=(0, 0, None)``); PGD with one perturbation per alpha (``in_dims`` 0 for the
  images too) and each alpha's input gradient from ``vmap(torch.func.grad(loss))``, the
  same random start for every alpha.

Before timing, the vmap outputs are checked against the sequential ones (logits, predictions,
adversarial images). Each side is timed alternately (the order swaps every repeat); medians of
5 repeats, wall seconds, and the ratio of the fastest repeats (the least disturbed by other
jobs on a shared box). The weights are random, so the attack rarely flips a prediction; PGD runs its
10 steps whatever it achieves, so its time does not depend on that.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from benchmarks.common import machine
from rift_ray.attacks import pgd_attack
from rift_ray.models import build_model
from rift_ray.rift.interpolate import interpolate

ATTACK = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}  # sweeps/cifar10-cpu.yaml
State = dict[str, Tensor]


def states(seed: int = 0) -> tuple[nn.Module, State, State]:
    """small_resnet in eval mode and two state dicts (AT-like, FT-like) with real BN statistics."""
    torch.manual_seed(seed)
    model = build_model("small_resnet", 10)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(256, 3, 32, 32))
    at = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the "fine-tuned" weights: a perturbation, BN stats on other images
        for p in model.parameters():
            p.add_(0.2 * p.std() * torch.randn_like(p))
        model(torch.rand(256, 3, 32, 32) * 0.8)
    ft = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(at)
    return model.eval(), at, ft


class Side:
    """One way of evaluating K alphas: ``clean(x)`` -> logits [K, N, 10];
    ``pgd(x, y)`` -> (adversarial images [K, M, ...], their logits [K, M, 10])."""

    def __init__(self, model: nn.Module, at: State, ft: State, alphas: list[float], batch: int):
        self.model, self.at, self.ft, self.alphas, self.batch = model, at, ft, alphas, batch

    def chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.batch, n)) for i in range(0, n, self.batch)]


class Sequential(Side):
    def clean(self, x: Tensor) -> Tensor:
        out = []
        for a in self.alphas:
            self.model.load_state_dict(interpolate(self.at, self.ft, a))
            with torch.no_grad():
                out.append(torch.cat([self.model(x[s]) for s in self.chunks(len(x))]))
        return torch.stack(out)

    def pgd(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        advs, logits = [], []
        for a in self.alphas:
            self.model.load_state_dict(interpolate(self.at, self.ft, a))
            gen = torch.Generator().manual_seed(0)  # evaluate(): one generator per alpha
            adv = torch.cat(
                [pgd_attack(self.model, x[s], y[s], **ATTACK, generator=gen)
                 for s in self.chunks(len(x))]
            )  # fmt: skip
            with torch.no_grad():
                logits.append(torch.cat([self.model(adv[s]) for s in self.chunks(len(x))]))
            advs.append(adv)
        return torch.stack(advs), torch.stack(logits)


class Vmapped(Side):
    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        model = self.model
        self.params = [n for n, _ in model.named_parameters()]
        self.buffers = [n for n, _ in model.named_buffers()]

        def forward(p: State, b: State, x: Tensor) -> Tensor:
            return functional_call(model, (p, b), (x,))

        def loss(p: State, b: State, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(forward(p, b, x), y)

        self.shared: Callable[..., Tensor] = torch.vmap(forward, in_dims=(0, 0, None))
        self.own: Callable[..., Tensor] = torch.vmap(forward, in_dims=(0, 0, 0))
        self.input_grad: Callable[..., Tensor] = torch.vmap(
            grad(loss, argnums=2), in_dims=(0, 0, 0, None)
        )

    def stacked(self) -> tuple[State, State]:
        sts = [interpolate(self.at, self.ft, a) for a in self.alphas]
        p = {n: torch.stack([s[n] for s in sts]) for n in self.params}
        b = {n: torch.stack([s[n] for s in sts]) for n in self.buffers}
        return p, b

    def clean(self, x: Tensor) -> Tensor:
        p, b = self.stacked()
        with torch.no_grad():
            return torch.cat([self.shared(p, b, x[s]) for s in self.chunks(len(x))], dim=1)

    def pgd(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        p, b = self.stacked()
        k, eps, step = len(self.alphas), ATTACK["eps"], ATTACK["step_size"]
        gen = torch.Generator().manual_seed(0)
        advs, logits = [], []
        for s in self.chunks(len(x)):
            xb, yb = x[s], y[s]
            noise = torch.rand(xb.shape, generator=gen, dtype=xb.dtype)  # as pgd_attack draws it
            start = (xb + (2 * noise - 1) * eps).clamp(0, 1)
            lo, hi = (xb - eps).clamp(0, 1), (xb + eps).clamp(0, 1)
            adv = start.expand(k, *start.shape).clone()
            for _ in range(int(ATTACK["steps"])):
                g = self.input_grad(p, b, adv, yb)
                adv = torch.max(torch.min(adv + step * g.sign(), hi), lo)
            with torch.no_grad():
                logits.append(self.own(p, b, adv))
            advs.append(adv)
        return torch.cat(advs, dim=1), torch.cat(logits, dim=1)


def check(k: int, seq: Side, vm: Side, x: Tensor, xp: Tensor, yp: Tensor) -> list[str]:
    """Vmap vs sequential on the same inputs: what differs (clean logits, predictions, PGD)."""
    lines = []
    ls, lv = seq.clean(x), vm.clean(x)
    d = (ls - lv).abs().max().item()
    same = bool((ls.argmax(-1) == lv.argmax(-1)).all())
    ok = d < 1e-4 and same
    lines.append(f"K={k} clean: max |d logits| {d:.1e}, same predictions {same} -> "
                 f"{'OK' if ok else 'MISMATCH'}")  # fmt: skip
    (as_, ps), (av, pv) = seq.pgd(xp, yp), vm.pgd(xp, yp)
    dx = (as_ - av).abs()
    d = (ps - pv).abs().max().item()
    agree = (ps.argmax(-1) == pv.argmax(-1)).float().mean().item()
    acc_s = (ps.argmax(-1) == yp).float().mean(1).mul(100).tolist()
    acc_v = (pv.argmax(-1) == yp).float().mean(1).mul(100).tolist()
    lines.append(
        f"K={k} PGD: max |d x_adv| {dx.max().item():.1e} ({(dx > 1e-6).float().mean().item():.2%}"
        f" of pixels differ), max |d logits| {d:.1e}, predictions agree {agree:.2%}, "
        f"robust acc per alpha seq {[round(a, 1) for a in acc_s]} vmap "
        f"{[round(a, 1) for a in acc_v]} -> {'identical' if d < 1e-4 and agree == 1 else 'DIFFERS'}"
    )
    return lines


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads: printed per repeat)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def images(n: int, g: torch.Generator) -> Tensor:
    """Smooth random images (bilinear 4x4 -> 32x32 noise, random contrast): varied predictions."""
    low = torch.rand(n, 3, 4, 4, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="2,4,6", help="numbers of alphas")
    ap.add_argument("--n", type=int, default=1000, help="images for the clean forward")
    ap.add_argument("--m", type=int, default=200, help="images for PGD-10")
    ap.add_argument("--batch", type=int, default=500, help="eval batch (cifar10-cpu: 500)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; load average at start {os.getloadavg()} (shared box)")
    print(f"small_resnet, eval mode; clean on N={args.n}, PGD-10 on M={args.m} random images, "
          f"batch {args.batch} per alpha; {args.repeats} repeats, medians, wall seconds\n")  # fmt: skip
    model, at, ft = states()
    g = torch.Generator().manual_seed(1)
    x, xp = images(args.n, g), images(args.m, g)
    with torch.no_grad():
        yp = model(xp).argmax(1)  # labels: the AT model's predictions (clean accuracy 100%)
    rows = []
    for k in [int(s) for s in args.ks.split(",")]:
        alphas = [round((i + 1) / k, 4) for i in range(k)]
        seq = Sequential(model, at, ft, alphas, args.batch)
        vm = Vmapped(model, at, ft, alphas, args.batch)
        for line in check(k, seq, vm, x, xp, yp):  # also the warm-up of both sides
            print(line, flush=True)
        t: dict[str, list[tuple[float, float]]] = {}
        for r in range(args.repeats):  # interleaved; the order swaps every repeat
            order = [("seq", seq), ("vmap", vm)]
            for what in ("clean", "pgd"):
                for name, side in order if r % 2 == 0 else order[::-1]:
                    fn = (lambda s=side: s.clean(x)) if what == "clean" else (
                        lambda s=side: s.pgd(xp, yp))  # fmt: skip
                    t.setdefault(f"{name} {what}", []).append(timed(fn))
        med = {key: statistics.median(w for w, _ in v) for key, v in t.items()}
        best = {key: min(w for w, _ in v) for key, v in t.items()}
        rows.append((k, med, best))
        walls = ", ".join(f"{key} [{' '.join(f'{w:.2f}/{c:.2f}' for w, c in v)}]"
                          for key, v in t.items())  # fmt: skip
        print(f"K={k} wall/CPU s: {walls}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print("\nwall seconds, median of the repeats; seq/vmap > 1: vmap faster; 'best': the same "
          "ratio of the fastest repeats (least disturbed by the other jobs)")  # fmt: skip
    print("\n| K alphas | clean seq s | clean vmap s | clean seq/vmap | best | PGD-10 seq s | "
          "PGD-10 vmap s | PGD seq/vmap | best |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for k, m, b in rows:
        print(f"| {k} | {m['seq clean']:.2f} | {m['vmap clean']:.2f} | "
              f"**{m['seq clean'] / m['vmap clean']:.2f}x** | "
              f"{b['seq clean'] / b['vmap clean']:.2f}x | {m['seq pgd']:.2f} | "
              f"{m['vmap pgd']:.2f} | **{m['seq pgd'] / m['vmap pgd']:.2f}x** | "
              f"{b['seq pgd'] / b['vmap pgd']:.2f}x |")  # fmt: skip
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
