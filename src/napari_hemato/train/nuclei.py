"""Train the H&E nucleus instance model and export it as ONNX + ``model.json``.

The network (:class:`~napari_hemato.train.nets.SmallUNet`) predicts two maps at
0.5 µm/px: ``foreground`` (sigmoid probability of nucleus) and ``distance``
(per-nucleus distance to the border scaled to 1 at the centre). The engine
turns them into instances with
:func:`napari_hemato.core.postprocess.postprocess_instances`.

Usage::

    python -m napari_hemato.train.nuclei --data ../shared/data --out MODEL_DIR \\
        --epochs 40 --seed 0 --threads 1 [--resume] [--max-minutes 70]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from napari_hemato.core.metrics import aggregated_jaccard_index, match_instances
from napari_hemato.core.postprocess import postprocess_instances
from napari_hemato.train import data_nuclei as dn
from napari_hemato.train import loop
from napari_hemato.train.augment import ColorAugment, geometric_crop
from napari_hemato.train.common import normalize
from napari_hemato.train.nets import SigmoidOutputs, SmallUNet
from napari_hemato.train.scripts import add_schedule_options, schedule_options

log = logging.getLogger("napari_hemato.train.nuclei")

NAME = "hemato-nuclei-he"
VERSION = "0.2.0"
NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
OUTPUTS = {"foreground": "foreground", "distance": "distance"}
DEFAULT_POSTPROCESS = {
    "threshold": 0.5,
    "min_distance_um": 2.5,
    "min_area_um2": 6.0,
    "seed_threshold": 0.3,
}
MAX_OBJECT_UM = 24.0


class CropSampler:
    """Random training crops (image, fg, dist) from a list of images."""

    def __init__(self, items, *, crop: int, miccai_fraction: float = 0.6,
                 export_fraction: float = 0.5) -> None:
        """Crops come ``miccai_fraction`` from MICCAI and the rest from DSB; when the plugin's
        exports (source ``export``) are present they get ``export_fraction`` of all crops."""
        self.items = items
        self.crop = crop
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.source, []).append(i)
        reference = [g for g in groups if g != "export"]
        own = export_fraction if "export" in groups and reference else 1.0
        probs = np.zeros(len(items))
        for source, idx in groups.items():
            if source == "export":
                share = own
            elif len(reference) == 1:
                share = 1 - own if "export" in groups else 1.0
            else:
                share = (1 - own) * (miccai_fraction if source == dn.MICCAI else 1 - miccai_fraction)
            area = np.array([items[i].image.shape[0] * items[i].image.shape[1] for i in idx], float)
            probs[idx] = share * area / area.sum()
        self.probs = probs / probs.sum()
        self.arrays = [
            (
                np.ascontiguousarray(it.image.transpose(2, 0, 1)),
                it.targets["fg"][None],
                it.targets["dist"][None],
            )
            for it in items
        ]

    def batch(self, n: int, rng: np.random.Generator):
        xs, fgs, ds = [], [], []
        for i in rng.choice(len(self.items), size=n, p=self.probs):
            x, fg, d = geometric_crop(self.arrays[i], self.crop, rng, pad_values=(255, 0, 0))
            xs.append(x)
            fgs.append(fg)
            ds.append(d)
        return torch.stack(xs), torch.stack(fgs), torch.stack(ds)


def loss_fn(logits: torch.Tensor, fg: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on the foreground, weighted MSE on the distance map."""
    fl, dl = logits[:, :1], logits[:, 1:2]
    bce = F.binary_cross_entropy_with_logits(fl, fg)
    p = torch.sigmoid(fl)
    dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    w = 1 + 4 * fg
    mse = (w * (torch.sigmoid(dl) - dist) ** 2).sum() / w.sum()
    return bce + dice + 5 * mse


class NucleiRecipe(loop.Recipe):
    """Batches of :class:`CropSampler` crops with colour augmentation; tune-split F1 / AJI."""

    def __init__(self, sampler: CropSampler, batch_size: int, tune_items, div: int) -> None:
        self.sampler, self.batch_size, self.tune_items, self.div = sampler, batch_size, tune_items, div
        self.color = ColorAugment()

    def batch(self, rng):
        x, fg, dist = self.sampler.batch(self.batch_size, rng)
        return normalize(self.color(x, rng), NORMALIZATION), fg, dist

    def loss(self, net, batch):
        x, fg, dist = batch
        return {"loss": loss_fn(net(x), fg, dist)}

    def evaluate(self, net) -> dict:
        if not self.tune_items:
            return {}
        val = quick_validation(net, self.tune_items, self.div, DEFAULT_POSTPROCESS)
        return {f"tune_{k}": v for k, v in val.items()}


def pad_to(x: np.ndarray, div: int, value: int = 255) -> np.ndarray:
    """Pad (H, W, C) at the bottom/right to multiples of ``div``."""
    h, w = x.shape[:2]
    ph, pw = (-h) % div, (-w) % div
    return np.pad(x, ((0, ph), (0, pw), (0, 0)), constant_values=value)


@torch.no_grad()
def predict_maps(model, image: np.ndarray, div: int) -> tuple[np.ndarray, np.ndarray]:
    """(fg, dist) maps of one uint8 RGB image with a torch model (eval mode)."""
    h, w = image.shape[:2]
    x = torch.from_numpy(pad_to(image, div).transpose(2, 0, 1)[None].astype(np.float32))
    y = torch.sigmoid(model(normalize(x, NORMALIZATION)))[0].numpy()
    return y[0, :h, :w], y[1, :h, :w]


def quick_validation(model, items, div: int, postprocess: dict) -> dict:
    """Pooled F1@0.5 and mean AJI on the model grid (used during training)."""
    model.eval()
    tp = fp = fn = 0
    ajis = []
    for it in items:
        fg, d = predict_maps(model, it.image, div)
        pred = postprocess_instances(postprocess, dn.MODEL_MPP, fg, d)
        m = match_instances(it.labels, pred)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
        ajis.append(aggregated_jaccard_index(it.labels, pred))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {"f1": round(f1, 4), "aji_mean": round(float(np.mean(ajis)), 4)}


def build_spec(net: SmallUNet, *, postprocess: dict, extra: dict) -> dict:
    """The ``model.json`` fields for a trained network (:func:`napari_hemato.train.loop.dense_spec`)."""
    return loop.dense_spec(net, postprocess=postprocess, extra=extra, name=NAME, version=VERSION,
                           task="nuclei", mpp=dn.MODEL_MPP, tile=768, max_object_um=MAX_OBJECT_UM,
                           normalization=dict(NORMALIZATION), class_names=["nucleus"],
                           outputs=dict(OUTPUTS))


def export_model(net: SmallUNet, out_dir: Path, *, check_items=(), postprocess=None, extra=None):
    """Write ``model.onnx`` (checked against torch), ``model.json`` and a card into ``out_dir``."""
    net = copy.deepcopy(net).eval()
    div = net.size_divisor
    checks = [pad_to(it.image[: 4 * div, : 6 * div], div) for it in list(check_items)[:2]]
    spec = build_spec(net, postprocess=postprocess or DEFAULT_POSTPROCESS, extra=dict(extra or {}))
    loop.export_dense(SigmoidOutputs(net).eval(), out_dir, spec, check_images=checks)
    return Path(out_dir)


def _split_data_dirs(data_dir) -> tuple[Path | None, list[Path]]:
    """(reference folder with the public sources or None, export folders)."""
    dirs = [Path(d) for d in (data_dir if isinstance(data_dir, (list, tuple)) else [data_dir])]
    reference = [d for d in dirs if dn.is_reference_folder(d)]
    if len(reference) > 1:
        raise ValueError(f"more than one reference data folder: {reference}")
    return (reference[0] if reference else None), [d for d in dirs if d not in reference]


def train_nuclei(data_dir: str | Path, out_dir: str | Path, *, epochs: int = 40, seed: int = 0,
                 threads: int = 1, resume: bool = False, steps_per_epoch: int = 100,
                 batch_size: int = 8, crop: int = 192, lr: float = 3e-3,
                 widths: tuple[int, ...] = (16, 32, 64, 96), head_channels: int = 8,
                 ema_decay: float = 0.998, max_minutes: float | None = None,
                 export: bool = True) -> dict:
    """Train the nucleus model; checkpoint each epoch; export ONNX + spec.

    Parameters
    ----------
    data_dir : path or list of paths
        Folder holding ``nuclei_he_miccai/`` and/or ``nuclei_dsb2018_brightfield/``
        (``X.png`` + ``X_label.tif``; split into train / tune / validation), and/or
        folders of the plugin's exported nucleus masks, which are all training images
        (:func:`~napari_hemato.train.data_nuclei.load_export_images`; half the crops).
    out_dir : path
        Model folder: ``checkpoint.safetensors``, ``history.json``, ``model.onnx``,
        ``model.json``, ``MODEL_CARD.md``.
    epochs, steps_per_epoch, batch_size, crop : int
        Schedule; a cosine learning rate spans ``epochs * steps_per_epoch`` steps.
    seed : int
        Seeds python, numpy and torch; the run is reproducible on one thread.
    threads : int
        ``torch.set_num_threads``.
    resume : bool
        Continue from ``out_dir/checkpoint.safetensors`` when present.
    max_minutes : float, optional
        Time budget (:func:`napari_hemato.train.loop.train`): the cosine decay
        follows the clock when that is ahead of the steps, and training stops at
        the step that crosses the budget. Runs that hit the budget are seeded
        but not bit-for-bit reproducible.

    Returns
    -------
    dict
        ``history`` (per-epoch loss and validation), ``train_keys``,
        ``val_keys``, ``minutes`` and ``params``.

    Examples
    --------
    >>> train_nuclei("../shared/data", "models/nuclei", epochs=40)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    rng = loop.begin(seed, threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference, exports = _split_data_dirs(data_dir)
    train_keys, tune_keys, val_keys = [], [], []
    if reference is not None:
        train_keys, val_keys = dn.split_keys(dn.list_keys(reference))
        train_keys, tune_keys = dn.split_tune(train_keys)
    train_items = dn.load_images(reference, train_keys) if train_keys else []
    tune_items = dn.load_images(reference, tune_keys) if tune_keys else []
    val_items = dn.load_images(reference, val_keys) if val_keys else []
    export_items = [it for d in exports for it in dn.load_export_images(d)]
    train_items += export_items
    train_keys = [it.key for it in train_items]
    if not train_items:
        raise ValueError(f"{data_dir}: no training images left after the validation split")
    log.info("data: %d training (%d from exports), %d tuning, %d validation images (validation "
             "untouched until the end)", len(train_items), len(export_items), len(tune_items),
             len(val_items))

    net = SmallUNet(widths=tuple(widths), head_channels=head_channels)
    recipe = NucleiRecipe(CropSampler(train_items, crop=crop), batch_size, tune_items,
                          net.size_divisor)
    run, params = loop.train_dense(
        net, recipe, out_dir, warmup_cap=200, lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
        rng=rng, max_minutes=max_minutes, ema_decay=ema_decay, resume=resume,
        config={"widths": list(widths), "head_channels": head_channels, "seed": seed,
                "batch_size": batch_size, "crop_px": crop, "lr": lr})
    history, minutes = run.rows, run.minutes
    result = {
        "history": history,
        "train_keys": train_keys,
        "val_keys": val_keys,
        "tune_keys": tune_keys,
        "minutes": round(minutes, 1),
        "params": params,
        "model": run.model,
    }
    if export:
        extra = {
            "validation_images": [{"key": it.key, "mpp": round(it.mpp, 5)} for it in val_items],
            "tune_images": [{"key": it.key, "mpp": round(it.mpp, 5)} for it in tune_items],
            "train_images": len(train_keys),
            "export_images": [{"key": it.key, "mpp": round(it.mpp, 5)} for it in export_items],
            "training": {
                "epochs": len(history),
                "steps_per_epoch": steps_per_epoch,
                "batch_size": batch_size,
                "crop_px": crop,
                "seed": seed,
                "threads": threads,
                "minutes": round(minutes, 1),
                "widths": list(widths),
                "head_channels": head_channels,
                "parameters": params,
                "dsb_target_median_diameter_px": dn.TARGET_MEDIAN_DIAMETER_PX,
            },
        }
        export_model(run.model, out_dir, check_items=tune_items or train_items, extra=extra)
    log.info(
        "done in %.1f min total (%.1f this session)", minutes, (time.perf_counter() - t_start) / 60
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m napari_hemato.train.nuclei", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="folder with nuclei_he_miccai/ and nuclei_dsb2018_brightfield/, or a folder of the "
        "plugin's exported nucleus masks (training images); repeat to combine",
    )
    p.add_argument("--out", required=True, help="model folder to write")
    add_schedule_options(p, train_nuclei)
    p.add_argument(
        "--no-eval", action="store_true", help="skip post-processing tuning and evaluation"
    )
    p.add_argument("--no-int8", action="store_true",
                   help="do not add the int8 network the CPU runs (train.quantize)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train_nuclei(args.data, args.out, **schedule_options(args))
    reference, _ = _split_data_dirs(args.data)
    if not args.no_eval and reference is None:
        log.warning("no reference data folder: post-processing not tuned, no validation metrics")
    elif not args.no_eval:
        from napari_hemato.train.evaluate_nuclei import evaluate_both, tune_postprocess

        tune_postprocess(args.out, reference, threads=args.threads)
        if not args.no_int8:  # calibrated on the training images only
            from napari_hemato.train.quantize import quantize_folder

            quantize_folder(args.out, reference)
        metrics = evaluate_both(args.out, reference)
        (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
