"""Helpers shared by the training scripts (torch; ``train`` extra).

- :func:`seed_everything` and :func:`rng_state` / :func:`set_rng_state` for
  seeded, resumable runs;
- :class:`ColorAugment` and :func:`geometric_crop`: batch augmentation in torch
  (HED stain jitter, brightness/contrast/saturation, blur, JPEG re-compression;
  flips, rot90, scale jitter);
- :func:`cosine_lr`, :func:`ema_update`, :func:`save_checkpoint` /
  :func:`load_checkpoint` (atomic) and :func:`step_bar`: the pieces of the
  trainers' epoch loops;
- :func:`export_onnx` (export + onnxruntime ≈ torch check), :func:`onnx_speed`
  and :func:`receptive_field_radius`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

# Ruifrok & Johnston stain vectors, as in skimage.color (rgb_from_hed)
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


# -- seeding -----------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch.

    ``torch.use_deterministic_algorithms`` is not called: it imports
    ``torch._inductor``, which crashes (SIGSEGV) in a process that has already
    loaded Qt/vispy/numba (e.g. a test session with napari viewers). CPU
    convolutions here are deterministic for a fixed thread count anyway.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(gen: np.random.Generator) -> dict:
    """Everything needed to resume the random streams exactly."""
    return {"numpy": gen.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(gen: np.random.Generator, state: dict) -> None:
    gen.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


# -- the epoch loop ----------------------------------------------------------
def cosine_lr(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 2 % of ``base``.

    ``progress`` (0 → 1) is how far the decay has gone; trainers pass the
    larger of the step fraction and the wall-time fraction of a budget.

    Examples
    --------
    >>> [round(cosine_lr(s, p, 1.0, 10), 3) for s, p in ((0, 0), (9, 0), (50, 0.5), (99, 1))]
    [0.1, 1.0, 0.51, 0.02]
    """
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, max(float(progress), 0.0))
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for float tensors; integers are copied."""
    for e, p in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` under a temporary name, then rename: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def step_bar(total: int, desc: str):
    """A tqdm bar over an epoch's steps on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=None,
                dynamic_ncols=True, leave=False, mininterval=1.0)


# -- augmentation ------------------------------------------------------------
def geometric_crop(
    arrays: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
    *,
    scale_range: tuple[float, float] = (0.8, 1.2),
    modes: Sequence[str] = (),
    pad_values: Sequence[float] = (),
) -> list[torch.Tensor]:
    """Random scaled crop + flips + rot90 of aligned (C, H, W) arrays.

    A window of ``size / s`` source pixels (``s`` drawn log-uniformly from
    ``scale_range``) is cut at a random place, padded with the edge value of
    each array when the image is smaller, and resized to ``size`` with
    ``modes[i]`` (``"bilinear"`` default, ``"nearest"`` for labels).

    Returns float32 (C, size, size) tensors.
    """
    h, w = arrays[0].shape[-2:]
    s = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    win = max(8, int(round(size / s)))
    y0 = int(rng.integers(0, max(h - win, 0) + 1))
    x0 = int(rng.integers(0, max(w - win, 0) + 1))
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    ph, pw = max(win - h, 0), max(win - w, 0)
    top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
    out = []
    for i, a in enumerate(arrays):
        t = torch.from_numpy(np.ascontiguousarray(a[..., y0 : y0 + win, x0 : x0 + win]))
        t = t.float()
        if ph or pw:
            value = float(pad_values[i]) if i < len(pad_values) else 0.0
            t = F.pad(t, (left, pw - left, top, ph - top), value=value)
        mode = modes[i] if i < len(modes) else "bilinear"
        if win != size:
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": win > size}
            t = F.interpolate(t[None], size=(size, size), mode=mode, **kw)[0]
        t = torch.rot90(t, k, dims=(-2, -1))
        if flip:
            t = torch.flip(t, dims=(-1,))
        out.append(t.contiguous())
    return out


class ColorAugment:
    """Photometric augmentation of a float RGB batch in [0, 255] (N, 3, H, W).

    Each image independently gets, with the given probabilities: HED stain
    jitter (per-stain scale ``1 ± hed_sigma`` and shift ``± hed_shift`` in
    optical-density space), brightness / contrast / saturation jitter, a
    gaussian blur, and JPEG re-compression at quality 30–95.
    """

    def __init__(
        self,
        *,
        hed_sigma: float = 0.08,
        hed_shift: float = 0.03,
        p_hed: float = 0.9,
        brightness: float = 0.15,
        contrast: float = 0.2,
        saturation: float = 0.25,
        p_bcs: float = 0.8,
        p_blur: float = 0.25,
        blur_sigma: tuple[float, float] = (0.3, 1.2),
        p_jpeg: float = 0.3,
        jpeg_quality: tuple[int, int] = (30, 95),
        p_gray: float = 0.03,
    ) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        self._hed_from_rgb = torch.tensor(_HED_FROM_RGB, dtype=torch.float32)
        self._rgb_from_hed = torch.tensor(_RGB_FROM_HED, dtype=torch.float32)

    def _hed(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        # x (3, H, W) in [0, 255] -> optical density -> stains -> jitter -> back
        od = -torch.log(torch.clamp(x, min=1.0) / 255.0)
        hed = torch.einsum("chw,cd->dhw", od, self._hed_from_rgb)
        alpha = torch.tensor(rng.uniform(1 - self.hed_sigma, 1 + self.hed_sigma, 3))
        beta = torch.tensor(rng.uniform(-self.hed_shift, self.hed_shift, 3))
        hed = hed * alpha.float()[:, None, None] + beta.float()[:, None, None]
        od = torch.einsum("dhw,dc->chw", hed, self._rgb_from_hed)
        return torch.clamp(255.0 * torch.exp(-od), 0.0, 255.0)

    def __call__(self, batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg
        from torchvision.transforms.functional import gaussian_blur

        out = []
        for x in batch:
            if rng.random() < self.p_hed:
                x = self._hed(x, rng)
            if rng.random() < self.p_bcs:
                b = rng.uniform(-self.brightness, self.brightness) * 255.0
                c = rng.uniform(1 - self.contrast, 1 + self.contrast)
                s = rng.uniform(1 - self.saturation, 1 + self.saturation)
                gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
                x = gray + (x - gray) * s
                x = (x - x.mean()) * c + x.mean() + b
            if rng.random() < self.p_gray:
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].expand(3, -1, -1)
            if rng.random() < self.p_blur:
                sig = float(rng.uniform(*self.blur_sigma))
                ks = 2 * int(math.ceil(2.5 * sig)) + 1
                x = gaussian_blur(x[None], [ks, ks], [sig, sig])[0]
            x = torch.clamp(x, 0.0, 255.0)
            if rng.random() < self.p_jpeg:
                q = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
                x = decode_jpeg(encode_jpeg(x.round().to(torch.uint8), quality=q)).float()
            out.append(x)
        return torch.stack(out)


# -- export and checks -------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_name: str = "image",
    output_names: Sequence[str],
    example: torch.Tensor,
    check_inputs: Sequence[torch.Tensor] = (),
    atol: float = 1e-4,
    opset: int = 17,
) -> float:
    """Export ``model`` (eval mode) to a single-file ONNX with dynamic N, H, W.

    The export is checked with ``onnx.checker`` and by running onnxruntime on
    ``example`` and every tensor of ``check_inputs``: the largest absolute
    difference to torch must stay below ``atol``.

    Returns
    -------
    float
        The largest absolute difference seen.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dyn = {0: "N", 2: "H", 3: "W"}
    # the TorchScript exporter handles these small conv nets reliably and gives one
    # self-contained file; torch >= 2.9 warns that it is no longer the default
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes={input_name: dyn, **{n: dyn for n in output_names}},
            opset_version=opset,
            external_data=False,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (example, *check_inputs):
        with torch.no_grad():
            ref = model(x)
        ref = ref if isinstance(ref, tuple | list) else (ref,)
        got = sess.run(list(output_names), {input_name: x.numpy()})
        for r, g in zip(ref, got, strict=True):
            if tuple(r.shape) != g.shape:
                raise AssertionError(f"onnx output shape {g.shape} != torch {tuple(r.shape)}")
            worst = max(worst, float(np.abs(r.numpy() - g).max()))
    if not worst < atol:
        raise AssertionError(f"onnxruntime differs from torch by {worst:.2e} (> {atol:.0e})")
    log.info(
        "exported %s (%.2f MB), max |onnx - torch| = %.2e", path, path.stat().st_size / 1e6, worst
    )
    return worst


def onnx_speed(
    path: str | Path, *, size: int = 512, threads: int = 2, repeats: int = 10, input_name="image"
) -> dict:
    """Throughput of an ONNX model on (1, 3, size, size) inputs with onnxruntime.

    Returns a dict with ``megapixels_per_s``, ``ms_per_tile`` (median),
    ``threads`` and ``size``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    for _ in range(2):
        sess.run(None, {input_name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {input_name: x})
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {
        "megapixels_per_s": round(size * size / 1e6 / med, 3),
        "ms_per_tile": round(1e3 * med, 1),
        "threads": threads,
        "size": size,
    }


def receptive_field_radius(model: nn.Module, *, size: int = 256, channels: int = 3) -> int:
    """Half-width (px) of the theoretical receptive field of a dense model.

    Back-propagates from the centre output pixel through the model in eval
    mode and returns the largest distance (∞-norm) from the centre at which
    the input gradient is non-zero. ``size`` must exceed twice the radius.
    """
    import copy

    model = copy.deepcopy(model).eval()
    for name, mod in list(model.named_modules()):  # linearise: no dead ReLUs
        if isinstance(mod, nn.ReLU) and name:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], nn.Identity())
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    y = model(x)
    y = torch.cat(list(y), dim=1) if isinstance(y, tuple | list) else y
    c = size // 2
    y[0, :, c, c].sum().backward()
    g = x.grad.abs().sum(dim=(0, 1))
    ii, jj = torch.nonzero(g > 0, as_tuple=True)
    radius = int(max((ii - c).abs().max(), (jj - c).abs().max()))
    if radius >= c - 1:
        raise ValueError(f"receptive field reaches the border of a {size}px probe: use larger size")
    return radius
