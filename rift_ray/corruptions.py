"""CIFAR-10-C corruptions regenerated on demand, for any 32x32-style RGB image set.

A re-implementation of ``make_cifar_c.py`` (Hendrycks & Dietterich 2019,
github.com/hendrycks/robustness, ImageNet-C/create_c/) with CIFAR-10-C's severity
parameters, in torch (numpy/PIL for JPEG and pixelate). It is *regenerated*, not the
official data: the random draws differ, and some steps are approximations (see
``APPROXIMATE`` and ``docs/evaluation.md``), so headline numbers should come from the
official files (:func:`load_cifar_c`). ``frost`` needs the original frost
photographs and is not available.

    cells = generate_cifar_c(test, ["fog", "contrast"], [1, 2, 3, 4, 5], seed=0)
    corruption_accuracy(model, cells)   # same format as load_cifar_c

Everything is deterministic given ``seed``, the corruption, the severity and the input
batch. The parameters were tuned for 32x32 images; other square sizes run but are not
calibrated. Inputs and outputs are uint8 [N, 3, H, W]. No Ray here.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from rift_ray.data import DataError, ImageData

AVAILABLE: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
"""Every CIFAR-10-C corruption except ``frost`` (needs the original frost images)."""
APPROXIMATE: tuple[str, ...] = ("motion_blur", "snow", "spatter")
"""Corruptions whose original uses ImageMagick or OpenCV steps re-implemented here only
approximately (the others follow the reference algorithm up to float rounding)."""

Corruption = Callable[[Tensor, int, torch.Generator], Tensor]


# ---------------------------------------------------------------- helpers


def _uint8(x: Tensor, *, round_: bool = False) -> Tensor:
    """[0, 1] floats to uint8: truncated like the reference's ``np.uint8(x * 255)``."""
    x = x.clamp(0, 1) * 255
    return (x.round() if round_ else x.floor()).to(torch.uint8)


def _f(u: Tensor) -> Tensor:
    """uint8 -> float64 in [0, 1] (the reference computes in float64 too)."""
    return u.double() / 255


def _pad(x: Tensor, p: int, dim: int, mode: str) -> Tensor:
    """Pad ``dim`` by ``p`` on both sides: ``nearest`` (edge), ``symmetric`` (edge repeated,
    scipy "reflect") or ``reflect101`` (edge not repeated, OpenCV's default)."""
    n = x.shape[dim]
    i = torch.arange(-p, n + p)
    if mode == "nearest":
        i = i.clamp(0, n - 1)
    elif mode == "symmetric":
        i = torch.where(i < 0, -i - 1, torch.where(i >= n, 2 * n - i - 1, i))
    else:
        i = torch.where(i < 0, -i, torch.where(i >= n, 2 * n - i - 2, i))
    return x.index_select(dim, i.clamp(0, n - 1))


def _filter(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel of [N, C, H, W] with a 2-D kernel (odd size), same-size output."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    y = _pad(_pad(x.reshape(n * c, 1, h, w), kh // 2, 2, mode), kw // 2, 3, mode)
    return F.conv2d(y, kernel.to(x)[None, None]).reshape(n, c, h, w)


def _gaussian(x: Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """scipy/skimage ``gaussian`` over H and W of [N, C, H, W] (radius ``int(truncate*sigma+0.5)``)."""
    r = int(truncate * sigma + 0.5)
    if sigma <= 0 or r == 0:
        return x
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    return _filter(_filter(x, k[None, :], mode), k[:, None], mode)


def _gray(x: Tensor) -> Tensor:
    """OpenCV RGB2GRAY: [N, 3, H, W] -> [N, 1, H, W]."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _clipped_zoom(x: Tensor, z: float) -> Tensor:
    """Zoom the centre of [N, C, H, H] by ``z`` (scipy ``zoom``, order 1) and crop back to H."""
    h = x.shape[-1]
    ch = math.ceil(h / z)
    top = (h - ch) // 2
    out = round(ch * z)
    y = F.interpolate(
        x[..., top : top + ch, top : top + ch], size=(out, out), mode="bilinear", align_corners=True
    )
    t = (out - h) // 2
    return y[..., t : t + h, t : t + h]


def _uniform(shape: Sequence[int], lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(tuple(shape), generator=g, dtype=torch.float64)


def _motion_blur(x: Tensor, radius: int, sigma: float, angle_deg: Tensor) -> Tensor:
    """ImageMagick's MotionBlurImage re-implemented (as the imagecorruptions package does).

    A one-sided gaussian line kernel of width ``2 * radius + 1`` along ``angle_deg`` (one
    angle per image); samples outside the image take the edge pixel.
    """
    n, _, h, w = x.shape
    width = 2 * radius + 1
    k = torch.exp(-(torch.arange(width, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    a = torch.deg2rad(angle_deg).to(x.dtype)
    rows, cols = torch.arange(h), torch.arange(w)
    out = torch.zeros_like(x)
    for i in range(width):
        oy = torch.ceil(i * torch.sin(a) - 0.5).long()
        ox = torch.ceil(i * torch.cos(a) - 0.5).long()
        r = (rows[None] + oy[:, None]).clamp(0, h - 1)  # [N, H]
        c = (cols[None] + ox[:, None]).clamp(0, w - 1)  # [N, W]
        y = x.gather(2, r[:, None, :, None].expand(-1, x.shape[1], -1, w))
        y = y.gather(3, c[:, None, None, :].expand(-1, x.shape[1], h, -1))
        out += k[i] * y
    return out


def _plasma(n: int, size: int, decay: float, g: torch.Generator) -> Tensor:
    """Diamond-square plasma fractals [n, size, size] in [0, 1] (``size`` a power of two)."""
    m = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled_mean(a: Tensor) -> Tensor:  # sic: the reference scales the noise by wibble twice
        return a / 4 + wibble * _uniform(a.shape, -wibble, wibble, g)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(sq)
        dr, ul = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled_mean(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def _pil_map(images: Tensor, fn: Callable[[Image.Image], Image.Image]) -> Tensor:
    out = [np.asarray(fn(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- the corruptions
# Each takes uint8 [N, 3, H, W], the severity (1..5) and a generator; returns uint8.


def gaussian_noise(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    x = _f(u)
    return _uint8(x + c * torch.randn(x.shape, generator=g, dtype=x.dtype))


def shot_noise(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [500, 250, 100, 75, 50][s - 1]
    return _uint8(torch.poisson(_f(u) * c, generator=g) / c)


def impulse_noise(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """skimage ``random_noise(mode="s&p")``: each value independently flipped to 0 or 1."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    x = _f(u)
    flip = torch.rand(x.shape, generator=g, dtype=x.dtype) < c
    salt = torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.5
    return _uint8(torch.where(flip, salt.to(x.dtype), x))


def speckle_noise(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.06, 0.1, 0.12, 0.16, 0.2][s - 1]
    x = _f(u)
    return _uint8(x + x * c * torch.randn(x.shape, generator=g, dtype=x.dtype))


def gaussian_blur(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.4, 0.6, 0.7, 0.8, 1.0][s - 1]
    return _uint8(_gaussian(_f(u), c))


def glass_blur(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Blur, then for every interior pixel (bottom-right to top-left) copy a random
    neighbour at offset in [-delta, delta) into it, then blur again. The reference writes
    this step as a numpy tuple swap of views, which copies rather than swaps; so do we."""
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][
        s - 1
    ]
    x = _uint8(_gaussian(_f(u), sigma)).permute(0, 2, 3, 1).clone()  # [N, H, W, C]
    n, h, w, _ = x.shape
    every = torch.arange(n)
    for _ in range(iters):
        ys, xs = range(h - delta, delta, -1), range(w - delta, delta, -1)
        d = torch.randint(-delta, delta, (len(ys), len(xs), 2, n), generator=g)
        for i, r in enumerate(ys):
            for j, c in enumerate(xs):
                x[every, r, c] = x[every, r + d[i, j, 1], c + d[i, j, 0]]
    return _uint8(_gaussian(_f(x.permute(0, 3, 1, 2)), sigma))


def defocus_blur(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Correlate with an anti-aliased disk: a 17x17 disk of ``radius`` blurred by a 3x3
    gaussian of sigma ``alias`` (OpenCV GaussianBlur / filter2D, reflect-101 borders)."""
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    L = torch.arange(-8, 9, dtype=torch.float64)
    disk = ((L[:, None] ** 2 + L[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    k3 = torch.exp(-(torch.arange(-1, 2, dtype=torch.float64) ** 2) / (2 * alias**2))
    k3 = k3 / k3.sum()
    kernel = _filter(
        _filter(disk[None, None], k3[None, :], "reflect101"), k3[:, None], "reflect101"
    )
    kernel = kernel[0, 0]
    r = int((kernel > 0).nonzero().sub(8).abs().max())  # crop the zeros: same result, faster
    return _uint8(_filter(_f(u), kernel[8 - r : 9 + r, 8 - r : 9 + r], "reflect101"))


def motion_blur(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Approximate: ImageMagick's motion blur re-implemented, angle uniform in [-45, 45]."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    angle = _uniform((len(u),), -45, 45, g)
    return _uint8(_motion_blur(_f(u), radius, sigma, angle), round_=True)


def zoom_blur(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    top = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    zooms = np.arange(1, top, 0.01)  # as the reference: 7, 12, 16, 21, 26 factors
    x = _f(u)
    out = sum((_clipped_zoom(x, float(z)) for z in zooms), torch.zeros_like(x))
    return _uint8((x + out) / (len(zooms) + 1))


def snow(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Approximate (motion-blurred snow layer via our ImageMagick re-implementation)."""
    loc, scale, zoom, thresh, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][s - 1]
    x = _f(u)
    n, _, h, w = x.shape
    layer = loc + scale * torch.randn((n, 1, h, w), generator=g, dtype=x.dtype)
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < thresh, 0.0, layer)
    layer = _f(_uint8(layer))  # the reference saves the layer as an 8-bit PNG
    angle = _uniform((n,), -135, -45, g)
    layer = _f(_uint8(_motion_blur(layer, radius, sigma, angle), round_=True))
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return _uint8(x + layer + layer.flip(2, 3))


def fog(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    x = _f(u)
    n, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()  # next power of two: 32 for CIFAR
    max_val = x.amax((1, 2, 3), keepdim=True)
    x = x + c * _plasma(n, size, decay, g)[:, None, :h, :w]
    return _uint8(x * max_val / (max_val + c))


def brightness(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """V += c in HSV (skimage), in closed form: RGB scales with V at fixed hue and saturation."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    x = _f(u)
    v = x.amax(1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    return _uint8(torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2.expand_as(x)))


def saturate(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """S = S * c0 + c1 in HSV (skimage), in closed form; grey pixels have hue 0 (red)."""
    c0, c1 = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][s - 1]
    x = _f(u)
    v = x.amax(1, keepdim=True)
    sat = torch.where(v > 0, (v - x.amin(1, keepdim=True)) / v.clamp_min(1e-12), 0.0)
    s2 = (sat * c0 + c1).clamp(0, 1)
    coloured = v - (v - x) * s2 / sat.clamp_min(1e-12)
    grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], 1)
    return _uint8(torch.where(sat > 0, coloured, grey))


def contrast(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    x = _f(u)
    mean = x.mean((2, 3), keepdim=True)
    return _uint8((x - mean) * c + mean)


def jpeg_compression(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    q = [80, 65, 58, 50, 40][s - 1]

    def jpeg(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(buf).convert("RGB")

    return _pil_map(u, jpeg)


def pixelate(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]

    def pix(im: Image.Image) -> Image.Image:
        w, h = im.size
        return im.resize((int(w * c), int(h * c)), Image.Resampling.BOX).resize(
            (w, h), Image.Resampling.BOX
        )

    return _pil_map(u, pix)


def elastic_transform(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Random affine (3 jittered points, bilinear, reflect-101 borders), then a smooth random
    displacement field (uniform noise blurred by sigma, times alpha), bilinear."""
    size = u.shape[-1]
    alpha, sigma, jitter = [
        tuple(f * size for f in p)
        for p in [
            (0, 0, 0.08),
            (0.05, 0.2, 0.07),
            (0.08, 0.06, 0.06),
            (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03),
        ]
    ][s - 1]
    x = _f(u)
    n, _, h, w = x.shape
    cs, sq = float(h // 2), float(min(h, w) // 3)
    pts1 = torch.tensor([[cs + sq, cs + sq], [cs + sq, cs - sq], [cs - sq, cs - sq]], dtype=x.dtype)
    pts2 = pts1 + _uniform((n, 3, 2), -jitter, jitter, g)
    a = torch.cat([pts1, torch.ones(3, 1, dtype=x.dtype)], 1).expand(n, 3, 3)
    m = torch.linalg.solve(a, pts2).transpose(1, 2)  # [N, 2, 3]: pts1 -> pts2 (x, y)
    full = torch.cat([m, torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype).expand(n, 1, 3)], 1)
    inv = torch.linalg.inv(full)[:, :2]  # warpAffine samples the source at M^-1 (x, y)
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij"
    )
    grid = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, -1, 3)
    src = (grid @ inv.transpose(1, 2)).reshape(n, h, w, 2)
    x = _sample(x, src[..., 0], src[..., 1])
    if alpha > 0:
        field = _uniform((n, 2, h, w), -1, 1, g)
        field = _gaussian(field, sigma, truncate=3, mode="symmetric") * alpha
        x = _sample(x, xx + field[:, 0], yy + field[:, 1])
    return _uint8(x)


def _sample(x: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Bilinear samples of [N, C, H, W] at pixel coordinates [N, H, W], reflected at the border."""
    h, w = x.shape[-2:]
    grid = torch.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def spatter(u: Tensor, s: int, g: torch.Generator) -> Tensor:
    """Severities 4-5 (mud) follow the reference; 1-3 (water) approximate OpenCV's Canny edges
    by the liquid mask's boundary and its L2 distance transform by an octagonal distance."""
    loc, scale, sigma, thresh, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ][s - 1]
    x = _f(u)
    n, _, h, w = x.shape
    liquid = loc + scale * torch.randn((n, 1, h, w), generator=g, dtype=x.dtype)
    liquid = _gaussian(liquid, sigma)
    liquid = torch.where(liquid < thresh, 0.0, liquid)
    if mud:
        m = _gaussian((liquid > thresh).to(x.dtype), intensity)
        m = torch.where(m < 0.8, 0.0, m)
        colour = torch.tensor([63, 42, 20], dtype=x.dtype).view(1, 3, 1, 1) / 255
        return _uint8(x * (1 - m) + colour * m)
    liquid8 = (liquid * 255).floor().remainder(256)  # numpy's uint8 cast wraps around
    mask = liquid8 > 0
    edge = mask & (-F.max_pool2d(-mask.to(x.dtype), 3, 1, 1) == 0)
    dist = _octagonal_distance(edge, 20).clamp(max=20)
    dist = _filter(dist, torch.full((3, 3), 1 / 9, dtype=x.dtype), "reflect101").floor()
    dist = _equalize(dist)
    emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=x.dtype)
    dist = _filter(dist, emboss, "reflect101").clamp(0, 255)
    dist = _filter(dist, torch.full((3, 3), 1 / 9, dtype=x.dtype), "reflect101")
    m = liquid8 * dist
    m = m / m.amax((2, 3), keepdim=True).clamp_min(1e-12) * intensity
    colour = torch.tensor([175, 238, 238], dtype=x.dtype).view(1, 3, 1, 1) / 255
    return _uint8(x + m * colour)


def _octagonal_distance(seeds: Tensor, limit: int) -> Tensor:
    """Distance to the nearest ``True`` pixel of [N, 1, H, W], alternating 8- and
    4-neighbour steps (an octagonal approximation of L2), capped at ``limit``."""
    dist = torch.full(seeds.shape, float(limit), dtype=torch.float64)
    reached = seeds.clone()
    dist[reached] = 0
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float64)
    for step in range(1, limit):
        r = reached.double()
        if step % 2:
            grown = F.max_pool2d(r, 3, 1, 1) > 0
        else:
            grown = F.conv2d(F.pad(r, (1, 1, 1, 1)), cross[None, None]) > 0
        dist[grown & ~reached] = step
        reached = grown
    return dist


def _equalize(x: Tensor) -> Tensor:
    """OpenCV ``equalizeHist`` per image of integer-valued [N, 1, H, W] in 0..255."""
    n = x.shape[0]
    v = x.reshape(n, -1).long()
    hist = torch.zeros(n, 256, dtype=torch.float64).scatter_add_(
        1, v, torch.ones_like(v, dtype=torch.float64)
    )
    total = v.shape[1]
    first = (hist > 0).double().argmax(1, keepdim=True)
    h_first = hist.gather(1, first)
    scale = 255 / (total - h_first).clamp_min(1)
    lut = ((hist.cumsum(1) - h_first) * scale).round().clamp(0, 255)
    lut = torch.where(h_first == total, torch.arange(256, dtype=torch.float64).expand(n, -1), lut)
    return lut.gather(1, v).reshape(x.shape)


_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "spatter": spatter,
    "saturate": saturate,
}


# ---------------------------------------------------------------- public API


def _generator(seed: int, name: str, severity: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{severity}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Corruption ``name`` at ``severity`` (1..5) of uint8 RGB images [N, 3, H, W] -> uint8.

    Deterministic given ``seed``, ``name``, ``severity`` and the batch (each cell draws
    from its own generator). Runs on the CPU in float64.
    """
    if name not in _CORRUPTIONS:
        hint = " (needs the original frost images)" if name == "frost" else ""
        raise ValueError(f"unknown corruption {name!r}{hint}; available: {', '.join(AVAILABLE)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        return images.clone()
    return _CORRUPTIONS[name](images.cpu(), severity, _generator(seed, name, severity)).contiguous()


def generate_cifar_c(
    data: ImageData,
    names: Sequence[str],
    severities: Sequence[int],
    seed: int = 0,
    chunk: int = 2000,
) -> dict[tuple[str, int], ImageData]:
    """Corrupted copies of ``data`` per ``(name, severity)``, in :func:`load_cifar_c`'s format.

    Images are processed ``chunk`` at a time (chunk ``i`` uses seed ``seed + i``) to bound
    memory; labels and classes are those of ``data``.
    """
    out: dict[tuple[str, int], ImageData] = {}
    for name in names:
        for s in severities:
            parts = [
                corrupt(data.images[i : i + chunk], name, s, seed=seed + i // chunk)
                for i in range(0, len(data), chunk)
            ]
            images = torch.cat(parts) if parts else data.images.clone()
            out[(name, s)] = ImageData(images, data.labels.clone(), list(data.classes))
    return out


_GET = "`rift-ray data cifar10-c` or `rift-ray data cifar100-c` downloads the official files"


def load_cifar_c(
    root: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    n_per_severity: int = 10000,
    classes: Sequence[str] | None = None,
) -> dict[tuple[str, int], ImageData]:
    """Corrupted test sets from ``<root>/<corruption>.npy`` (uint8 [5*n, 32, 32, 3]) and ``labels.npy``.

    Severity s (1..5) is rows (s-1)*n_per_severity to s*n_per_severity. Files are memory-mapped,
    so only the requested rows are read. ``classes`` defaults to "0", "1", ...
    ``rift-ray data cifar10-c`` (:mod:`rift_ray.downloads`) puts the official files in a ``root``.
    """
    root = Path(root).expanduser()
    labels_file = root / "labels.npy"
    if not labels_file.is_file():
        raise DataError(f"{labels_file}: CIFAR-C labels not found ({_GET})")
    labels = np.load(labels_file)
    names = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
    out: dict[tuple[str, int], ImageData] = {}
    for corruption in corruptions:
        f = root / f"{corruption}.npy"
        if not f.is_file():
            raise DataError(f"{f}: CIFAR-C file for corruption {corruption!r} not found ({_GET})")
        arr = np.load(f, mmap_mode="r")
        for s in severities:
            if not 1 <= s <= 5:
                raise ValueError(f"CIFAR-C severity must be in 1..5, got {s}")
            rows = slice((s - 1) * n_per_severity, s * n_per_severity)
            if arr.ndim != 4 or arr.shape[0] < rows.stop or len(labels) < rows.stop:
                raise DataError(
                    f"{f}: shape {arr.shape} has no rows {rows.start}:{rows.stop} for severity {s}"
                )
            images = torch.from_numpy(np.array(arr[rows])).permute(0, 3, 1, 2).contiguous()
            out[(corruption, s)] = ImageData(
                images, torch.from_numpy(labels[rows].astype(np.int64)), names
            )
    return out
