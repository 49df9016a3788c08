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
:mod:`napari_hemato.models.colour_standardize`). Sampling is square-root class-balanced;
AdamW, one-cycle (warm-up + cosine) learning rate, label smoothing.

Cells from other laboratories with only coarse labels (``--coarse-labels``
CSV of boxes in field images with groups NEU, EO, LY, MO, IG, ...; see
:mod:`napari_hemato.train.data_coarse`) join every batch and are trained with
the partial-label loss ``-log sum_{c in group} p_c``; their ``val`` rows are
scored as group accuracy each epoch. ``--init-from`` starts from another
run's weights (a fresh schedule: fine-tuning).
The epochs, checkpoints, ``--resume`` and the ``--max-minutes`` budget are
:func:`napari_hemato.train.loop.train`'s. The exported ONNX model has a dynamic
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
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin while waiting make 2-thread training 4-5x slower whenever another
# process uses a core; sleeping waits cost little. Only effective before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from napari_hemato.models.cell_classifier import CLASS_NAMES, DEFAULT_CONTEXT  # noqa: E402
from napari_hemato.models.colour_standardize import COLOUR_MODES, apply_colour_mode  # noqa: E402
from napari_hemato.models.window_scale import SCALE_MODES, WindowScale  # noqa: E402
from napari_hemato.train import loop  # noqa: E402
from napari_hemato.train.augment import StainAugment  # noqa: E402
from napari_hemato.train.checkpoint import load_weights  # noqa: E402
from napari_hemato.train.data_coarse import CoarseCells, coarse_accuracy, load_coarse  # noqa: E402
from napari_hemato.train.data_wbc import (  # noqa: E402
    CellImages,
    balanced_weights,
    load_split,
    runtime_inputs,
)
from napari_hemato.train.nets import (  # noqa: E402
    PRETRAINED_SOURCE,
    CamOutputs,
    freeze,
    set_train_mode,
)
from napari_hemato.train.nets import build_efficientnet as build_model  # noqa: E402
from napari_hemato.train.wbc_export import VERSION, export_model, normalize  # noqa: E402, F401
from napari_hemato.train.wbc_metrics import (  # noqa: E402
    calibration_record,
    fit_temperature,
    quick_metrics,
)

log = logging.getLogger(__name__)

#: the export wrapper's historical name
ExportNet = CamOutputs


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
    >>> float(group_nll(z, torch.tensor([[True, True, False]]))) < 1e-4
    True
    """
    inside = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - inside).mean()


# -- evaluation during training --------------------------------------------------
@torch.no_grad()
def predict_logits(net: nn.Module, inputs: np.ndarray, batch: int = 128) -> np.ndarray:
    """Logits of ``net`` (eval mode) on uint8 NHWC inputs."""
    net.eval()
    out = [net(normalize(inputs[i : i + batch])).numpy() for i in range(0, len(inputs), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)), np.float32)


# -- training ------------------------------------------------------------------
@dataclass
class WbcRecipe(loop.Recipe):
    """Class-balanced, augmented cell batches (+ coarse-labelled cells); val accuracy / F1."""

    train: CellImages
    weights: np.ndarray
    batch_size: int
    size: int
    context: float
    stain: StainAugment | None
    colour: str
    freeze_blocks: int
    label_smoothing: float
    val_labels: np.ndarray
    val_inputs: np.ndarray
    coarse: CoarseCells | None = None
    coarse_batch: int = 16

    def _cells(self, data, idx, rng):
        return make_batch(data, idx, rng, size=self.size, context=self.context, stain=self.stain,
                          colour=self.colour)

    def batch(self, rng):
        idx = rng.choice(len(self.train), size=self.batch_size, p=self.weights)
        x, y = self._cells(self.train, idx, rng), torch.from_numpy(self.train.labels[idx]).long()
        if self.coarse is None:
            return x, y, None, None
        cells = self.coarse.train
        cidx = rng.choice(len(cells), size=self.coarse_batch, p=self.coarse.weights)
        return x, y, self._cells(cells, cidx, rng), torch.from_numpy(cells.masks[cidx])

    def loss(self, net, batch):
        x, y, xc, allowed = batch
        if xc is None:
            logits, coarse = net(x), torch.zeros(())
        else:
            both = net(torch.cat([x, xc]))
            logits, coarse = both[: len(x)], group_nll(both[len(x):], allowed)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing) + coarse
        acc = (logits.detach().argmax(1) == y).float().mean()
        return {"loss": loss, "coarse_loss": coarse, "train_acc": acc}

    def train_mode(self, net) -> None:
        set_train_mode(net, self.freeze_blocks)

    def evaluate(self, net) -> dict:
        row = {}
        if len(self.val_inputs):
            m = quick_metrics(predict_logits(net, self.val_inputs), self.val_labels)
            row.update({f"val_{k}": v for k, v in m.items()})
        if self.coarse is not None and len(self.coarse.val):
            p = torch.softmax(torch.from_numpy(predict_logits(net, self.coarse.val_inputs)), 1).numpy()
            row["val_coarse_group_acc"] = coarse_accuracy(p, self.coarse.val.masks)
        return row


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
    scale: str = "self",
    window_um: float = 25.0,
    scale_jitter: float = 1.18,
) -> dict:
    """Train the classifier; checkpoint every epoch; export ONNX + spec.

    Parameters
    ----------
    data_dir : path
        Class folders or ``manifest.csv`` (see :mod:`napari_hemato.train.data_wbc`).
    out_dir : path
        Model folder: ``checkpoint.safetensors``, ``history.json``, ``geometry_*.csv``,
        ``model.onnx``, ``model.json``, ``MODEL_CARD.md``.
    epochs : int
        Epochs of ``steps_per_epoch`` steps (default: one pass over the
        training images).
    max_minutes : float, optional
        Wall-time budget: the cosine schedule follows the clock when it is
        ahead of the steps, and training stops at the step that crosses it.
    pretrained : bool
        Start from ImageNet weights (else from scratch).
    freeze_blocks : int, optional
        Keep the stem and this many first MBConv blocks fixed (weights and
        batch-norm statistics); default 3 when pretrained (1.5x faster
        steps), 0 from scratch.

    colour : {"od-standardize", "none"}
        Colour standardisation of every window (:mod:`napari_hemato.models.colour_standardize`),
        recorded in the spec's ``preprocess["colour"]``.
    coarse_labels, coarse_images : path, optional
        A coarse-label CSV and its image folder (:mod:`napari_hemato.train.data_coarse`):
        ``train`` rows join every batch (``coarse_batch`` cells, group-balanced),
        ``val`` rows are scored each epoch.
    init_from : path, optional
        Start from the weights of this checkpoint (``checkpoint.safetensors``, its
        model folder, or an old ``checkpoint.pt``, read with ``torch.load(weights_only=True)``);
        fresh optimiser and schedule.
    scale : {"self", "red-cell"}
        Window size (:mod:`napari_hemato.models.window_scale`, recorded in the spec's
        ``preprocess["scale"]``): the cell's own diameter x ``context`` (default), or a
        physical window of ``window_um`` at the pixel size the red-cell ruler reads
        (training windows: the median reading of the training images, jittered by
        ``scale_jitter``; validation: the runtime's per-image reading). In red-cell mode
        ``context`` (the fallback when the ruler fails) becomes ``window_um`` / the training
        cells' median diameter in µm.

    Returns
    -------
    dict
        History (per-epoch loss, validation accuracy / macro-F1, minutes).

    Examples
    --------
    >>> train_wbc("../shared/data/pbc", "models/wbc", epochs=14)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    rng = loop.begin(seed, threads)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scale not in SCALE_MODES:
        raise ValueError(f"scale {scale!r} is not one of {SCALE_MODES}")
    ws = WindowScale(scale, context, window_um if scale == "red-cell" else None)
    tr_df, va_df, rule, train, val = load_split(data_dir, out_dir, val_fraction=val_fraction, seed=seed,
                                                scale=ws)
    if ws.mode == "red-cell":
        context = ws.context  # load_split set the fallback from the training cells' sizes
        train.side_jitter = scale_jitter
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour {colour!r} is not one of {COLOUR_MODES}")
    val_inputs = runtime_inputs(val, size=size, context=context, colour=colour)
    coarse = None if coarse_labels is None else load_coarse(
        coarse_labels, coarse_images, size=size, context=context, colour=colour, scale=ws)

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
    steps = int(steps_per_epoch or max(1, math.ceil(len(train) / batch_size)))
    config = {
        "data": str(data_dir), "size": size, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "label_smoothing": label_smoothing, "context": context, "pretrained": pretrained, "seed": seed,
        "threads": threads, "steps_per_epoch": steps, "sampler": "class share ∝ sqrt(n_c)",
        "augment": augment, "freeze_blocks": freeze_blocks, "color_jitter": color_jitter,
        "colour": colour, "init_from": None if init_from is None else str(init_from),
        "scale": ws.as_preprocess() | ({"train_mpp": round(train.pooled_mpp, 5), "scale_jitter": scale_jitter}
                                       if ws.mode == "red-cell" else {}),
        "coarse": None if coarse is None else {
            "labels": str(coarse_labels), "images": str(coarse_images), "batch": coarse_batch,
            "n_train": len(coarse.train), "n_val": len(coarse.val),
            "loss": "partial-label -log sum_{c in group} p_c", "sampler": "group share ∝ sqrt(n_g)"}}
    if init_from is not None:
        net.load_state_dict(load_weights(init_from))
        log.info("initialised from %s", init_from)
    recipe = WbcRecipe(train, balanced_weights(train.labels, power=0.5), batch_size, size, context,
                       StainAugment(color_jitter) if augment else None, colour, freeze_blocks,
                       label_smoothing, np.zeros(0, int) if val is None else val.labels, val_inputs,
                       coarse, coarse_batch)
    run = loop.train(net, opt, recipe, out_dir, rng=rng, epochs=int(epochs), steps_per_epoch=steps,
                     lr=lr, warmup=max(1, min(steps // 2, 150)), max_minutes=max_minutes,
                     resume=resume, config=config)
    history, total_epochs = run.history, len(run.rows)
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
            fit_idx = np.sort(np.random.default_rng(seed + 1).permutation(len(val))[: len(val) // 2])
            temperature = fit_temperature(predict_logits(net, val_inputs[fit_idx]), val.labels[fit_idx])
            extra["calibration"] = calibration_record(temperature, seed, va_df["path"].iloc[fit_idx])
        export_model(net, out_dir, size=size, context=context, extra=extra, check_inputs=val_inputs[:64],
                     temperature=temperature, colour=colour, scale=ws.as_preprocess())
    return history


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m napari_hemato.train.wbc --data DIR --out MODEL_DIR``."""
    p = argparse.ArgumentParser(prog="python -m napari_hemato.train.wbc", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="class folders of cell images, or a folder with manifest.csv")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
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
    p.add_argument("--init-from", default=None,
                   help="start from the weights of this checkpoint (checkpoint.safetensors, its "
                        "folder, or an old checkpoint.pt) (fine-tuning)")
    p.add_argument("--scale", choices=SCALE_MODES, default="self",
                   help="window size: the cell's own diameter x context (self, default) or a physical "
                        "window at the red-cell ruler's pixel size (red-cell)")
    p.add_argument("--window-um", type=float, default=25.0, help="window side in µm (red-cell scale)")
    p.add_argument("--scale-jitter", type=float, default=1.18,
                   help="training window size jitter factor (red-cell scale; 1.18 = ±18 %%)")
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
              coarse_batch=args.coarse_batch, init_from=args.init_from, scale=args.scale,
              window_um=args.window_um, scale_jitter=args.scale_jitter)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
