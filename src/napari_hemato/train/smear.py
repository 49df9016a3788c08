"""Train the blood-smear cell instance model (RBC / WBC / Platelets) and export ONNX.

A :class:`~napari_hemato.train.nets.SmallUNet` at 0.16 µm/px (BCCD fields,
assumed 0.08 µm/px, downsampled ×2) predicts five channels: foreground
(sigmoid), distance to the cell border scaled to 1 at the centre (sigmoid) and
three class logits (softmax). Targets are pseudo-masks derived from BCCD boxes
(:mod:`napari_hemato.train.data_smear`). The engine splits touching cells by a
watershed seeded at local maxima of the distance map, and classifies each
object by its mean class probabilities.

Usage::

    python -m napari_hemato.train.smear --data ../shared/data/bccd --out MODEL_DIR \\
        --epochs 30 --seed 0 --threads 2 [--resume] [--max-minutes 25]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from napari_hemato.core.postprocess import postprocess_instances
from napari_hemato.core.stain_rule import PLATELET_RULE
from napari_hemato.train import data_smear as ds
from napari_hemato.train import loop
from napari_hemato.train.augment import ColorAugment
from napari_hemato.train.common import normalize
from napari_hemato.train.data_smear import load_training_data, split_stems
from napari_hemato.train.evaluate_smear import prf, score_image
from napari_hemato.train.nets import SmallUNet, SmearOutputs
from napari_hemato.train.scripts import add_schedule_options, schedule_options
from napari_hemato.train.smear_batches import CropSampler, class_weights, hue_jitter

log = logging.getLogger("napari_hemato.train.smear")

NAME = "hemato-smear-cells"
VERSION = "0.1.0"
NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
OUTPUTS = {"foreground": "foreground", "distance": "distance", "class_probs": "class_probs"}
DEFAULT_POSTPROCESS = {
    "threshold": 0.5,
    "min_distance_um": 2.0,
    "min_area_um2": 1.5,
    "seed_threshold": 0.5,
}
#: largest object (a big monocyte in a BCCD field is ~22 µm across) in µm
MAX_OBJECT_UM = 28.0
#: white-cell pieces smaller than this (µm²; a 7 µm lymphocyte is ~38 µm²) are dropped when
#: post-processing keeps white cells whole (``whole_classes``)
WBC_MIN_AREA_UM2 = 12.0
#: tiles of this many model pixels (~123 µm) per side
TILE = 768
def build_net(widths=(16, 32, 48, 64, 96), head_channels: int = 12) -> SmallUNet:
    return SmallUNet(out_channels=2 + len(ds.CLASS_NAMES), widths=tuple(widths),
                     head_channels=head_channels)


def loss_fn(logits, maps, cls, cw, *, platelet_weight: float = 4.0) -> dict:
    """Weighted BCE + Dice (foreground), weighted MSE (distance), weighted CE (class)."""
    fg, dist, w = maps[:, 0:1], maps[:, 1:2], maps[:, 2:3]
    w = w * (1 + (platelet_weight - 1) * (cls == 2).float()[:, None])
    fl, dl = logits[:, 0:1], logits[:, 1:2]
    bce = (F.binary_cross_entropy_with_logits(fl, fg, reduction="none") * w).sum() / w.sum().clamp(min=1)
    p = torch.sigmoid(fl) * (w > 0)
    dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    wd = w * (1 + 4 * fg)
    mse = (wd * (torch.sigmoid(dl) - dist) ** 2).sum() / wd.sum().clamp(min=1)
    if (cls >= 0).any():
        ce = F.cross_entropy(logits[:, 2:5], cls, weight=cw, ignore_index=-1)
    else:
        ce = logits.sum() * 0.0
    total = bce + dice + 5 * mse + 0.5 * ce
    return {"loss": total, "bce": bce, "dice": dice, "mse": mse, "ce": ce}


class SmearRecipe(loop.Recipe):
    """:class:`CropSampler` batches with hue and colour jitter; class-weighted loss; tune F1."""

    def __init__(self, sampler: CropSampler, batch_size: int, tune_set, div: int) -> None:
        self.sampler, self.batch_size, self.tune_set, self.div = sampler, batch_size, tune_set, div
        self.color = ColorAugment(jpeg_quality=(50, 95), p_jpeg=0.4, p_blur=0.3, p_gray=0.0)
        self.cw = class_weights(sampler.samples)
        log.info("class weights %s", dict(zip(ds.CLASS_NAMES, self.cw.tolist(), strict=True)))

    def batch(self, rng):
        x, maps, cls = self.sampler.batch(self.batch_size, rng)
        return normalize(self.color(hue_jitter(x, rng), rng), NORMALIZATION), maps, cls

    def loss(self, net, batch):
        x, maps, cls = batch
        return loss_fn(net(x), maps, cls, self.cw)

    def evaluate(self, net) -> dict:
        if not self.tune_set:
            return {}
        val = quick_validation(net, self.tune_set, self.div, DEFAULT_POSTPROCESS)
        return {f"tune_{n}": v for n, v in val.items()}


# -- prediction and quick validation on the model grid ---------------------------
@torch.no_grad()
def predict_maps(model: nn.Module, image: np.ndarray, div: int, margin: int = 64):
    """(fg, dist, class_probs (3, H, W)) for one uint8 image, white-padded like the engine."""
    h, w = image.shape[:2]
    ph = margin + (-(h + 2 * margin)) % div
    pw = margin + (-(w + 2 * margin)) % div
    x = np.pad(image, ((margin, ph), (margin, pw), (0, 0)), constant_values=255)
    xt = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))
    fg, dist, probs = SmearOutputs(model)(normalize(xt, NORMALIZATION))
    crop = (slice(margin, margin + h), slice(margin, margin + w))
    return fg[0, 0][crop].numpy(), dist[0, 0][crop].numpy(), probs[0][(slice(None), *crop)].numpy()


def objects_from_maps(fg, dist, probs, postprocess: dict, mpp: float = ds.MODEL_MPP):
    """Boxes (n, 4) and class names of instances, as the engine would make them."""
    labels = postprocess_instances(postprocess, mpp, fg, dist, probs, ds.CLASS_NAMES)
    n = int(labels.max())
    if n == 0:
        return np.zeros((0, 4)), np.zeros(0, object)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    mean = np.stack([np.bincount(flat, p.ravel(), minlength=n + 1)[1:] for p in probs], 1)
    names = np.asarray(ds.CLASS_NAMES, object)[(mean / area[:, None]).argmax(1)]
    from scipy import ndimage as ndi

    sl = ndi.find_objects(labels)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in sl], np.float64)
    return boxes, names


def score_maps(maps, samples, postprocess: dict) -> dict:
    """Per-class box P/R/F1 at IoU 0.5 on the model grid for precomputed maps.

    ``objective`` averages the WBC and platelet F1 with the RBC F1 counted in
    annotated regions only (see :mod:`napari_hemato.train.evaluate_smear`), so
    tuning does not learn to suppress the red cells BCCD left unannotated.
    """
    keys = (*ds.CLASS_NAMES, "RBC_annotated_regions")
    tot = {k: [0, 0, 0] for k in keys}
    for (fg, dist, probs), s in zip(maps, samples, strict=True):
        boxes, names = objects_from_maps(fg, dist, probs, postprocess)
        scored = score_image(s.boxes, boxes, names.astype(str))
        for k in keys:
            tot[k] = [tot[k][0] + scored[k]["tp"], tot[k][1] + scored[k]["fp"],
                      tot[k][2] + scored[k]["fn"]]
    out = {k: prf(*v) for k, v in tot.items()}
    out["macro_f1"] = round(float(np.mean([out[k]["f1"] for k in ds.CLASS_NAMES])), 4)
    out["objective"] = round(float(np.mean([out[k]["f1"] for k in keys[1:]])), 4)
    return out


def quick_validation(model, samples, div: int, postprocess: dict) -> dict:
    model.eval()
    maps = [predict_maps(model, s.image, div) for s in samples]
    m = score_maps(maps, samples, postprocess)
    return {"f1_" + k: m[k]["f1"] for k in ds.CLASS_NAMES} | {
        "macro_f1": m["macro_f1"], "objective": m["objective"]}


def tune_postprocess(model, samples, div: int) -> tuple[dict, dict]:
    """Grid-search the engine's post-processing on the tuning images (never on val)."""
    model.eval()
    maps = [predict_maps(model, s.image, div) for s in samples]
    best, best_score = dict(DEFAULT_POSTPROCESS), None
    whole = ({}, {"whole_classes": ["WBC"], "whole_min_area_um2": WBC_MIN_AREA_UM2})
    grid = itertools.product((0.4, 0.5, 0.6), (1.5, 2.0, 2.5, 3.0), (0.3, 0.5, 0.7), (1.0, 2.0), whole)
    for thr, md, st, area, wh in grid:
        pp = {"threshold": thr, "min_distance_um": md, "min_area_um2": area, "seed_threshold": st,
              **wh}
        m = score_maps(maps, samples, pp)
        if best_score is None or m["objective"] > best_score["objective"]:
            best, best_score = pp, m
    log.info("tuned post-processing %s: %s", best, best_score)
    return best, best_score


# -- export ----------------------------------------------------------------------
def add_red_cell_probe(model_dir: str | Path, voc_dir: str | Path, *, fields: int = 60,
                       threads: int = 2) -> dict:
    """Calibrate the red-cell pixel-size probe (:mod:`napari_hemato.core.smear_scale`) of an
    exported model on training fields (every 3rd, at most ``fields``) and store it in
    ``model.json`` → ``extra.red_cell_probe``."""
    from napari_hemato.core.slide import open_slide
    from napari_hemato.core.smear_scale import calibrate_reference
    from napari_hemato.models.onnx_backend import OnnxPredictor

    model_dir, voc_dir = Path(model_dir), Path(voc_dir)
    train, _, _ = split_stems(voc_dir)
    stems = train[::3][:fields]
    predictor = OnnxPredictor(model_dir, threads=threads)
    slides = [open_slide(voc_dir / "JPEGImages" / f"{s}.jpg") for s in stems]
    try:
        probe = calibrate_reference(predictor, [(sl, ds.BCCD_MPP) for sl in slides])
    finally:
        for sl in slides:
            sl.close()
    probe["calibrated_on"] = (f"{len(stems)} training fields of {voc_dir.name} (every 3rd of the "
                              f"training split, not tune or val) at {ds.BCCD_MPP} um/px")
    path = model_dir / "model.json"
    spec = json.loads(path.read_text())
    spec.setdefault("extra", {})["red_cell_probe"] = probe
    path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    log.info("red-cell probe: reference diameter %.3f um on %d fields", probe["reference_diameter_um"],
             len(stems))
    return probe


def build_spec(net: SmallUNet, *, postprocess: dict, extra: dict) -> dict:
    """The ``model.json`` fields for a trained network (:func:`napari_hemato.train.loop.dense_spec`)."""
    return loop.dense_spec(net, postprocess=postprocess, extra=extra, name=NAME, version=VERSION,
                           task="smear", mpp=ds.MODEL_MPP, assumed_input_mpp=ds.BCCD_MPP, tile=TILE,
                           max_object_um=MAX_OBJECT_UM, normalization=dict(NORMALIZATION),
                           class_names=list(ds.CLASS_NAMES), outputs=dict(OUTPUTS))


def export_model(net: SmallUNet, out_dir: str | Path, *, check_images=(), postprocess=None,
                 extra=None) -> Path:
    """Write ``model.onnx`` (checked: onnxruntime ≈ torch < 1e-4), ``model.json`` and a card."""
    net = copy.deepcopy(net).eval()
    div = net.size_divisor
    checks = []
    for img in list(check_images)[:2]:  # the image cut (or white-padded) to multiples of div
        h, w = (img.shape[0] // div) * div or div, (img.shape[1] // div) * div or div
        crop = np.full((h, w, 3), 255, np.uint8)
        crop[: min(h, img.shape[0]), : min(w, img.shape[1])] = img[:h, :w]
        checks.append(crop)
    spec = build_spec(net, postprocess=postprocess or DEFAULT_POSTPROCESS, extra=dict(extra or {}))
    loop.export_dense(SmearOutputs(net).eval(), out_dir, spec, check_images=checks)
    return Path(out_dir)


# -- training --------------------------------------------------------------------
def train_smear(data_dirs, out_dir: str | Path, *, epochs: int = 30, seed: int = 0, threads: int = 2,
                resume: bool = False, steps_per_epoch: int = 60, batch_size: int = 8, crop: int = 256,
                lr: float = 3e-3, widths: tuple[int, ...] = (16, 32, 48, 64, 96),
                head_channels: int = 12, ema_decay: float = 0.995, max_minutes: float | None = None,
                limit: int | None = None, tune: bool = True, export: bool = True) -> dict:
    """Train the smear model; checkpoint every epoch; tune post-processing; export.

    Parameters
    ----------
    data_dirs : path or list of paths
        BCCD-layout folders (``JPEGImages/``, ``Annotations/``, ``ImageSets/``)
        and/or export folders (``<stem>.png`` + ``<stem>_label.tif`` + ``<stem>.csv``).
    out_dir : path
        Model folder: ``checkpoint.safetensors``, ``history.json``, ``model.onnx``,
        ``model.json``, ``MODEL_CARD.md``.
    epochs, steps_per_epoch, batch_size, crop : int
        Schedule; the cosine learning rate spans ``epochs * steps_per_epoch`` steps
        (or ``max_minutes``, whichever ends first).
    seed : int
        Seeds python, numpy and torch.
    threads : int
        ``torch.set_num_threads``.
    resume : bool
        Continue from ``out_dir/checkpoint.safetensors`` when present.
    max_minutes : float, optional
        Wall-clock budget for training: the cosine follows the clock when it is
        ahead, and the run stops at the step that crosses the budget.
    limit : int, optional
        Use only this many training images per folder (smoke tests).
    tune, export : bool
        Grid-search post-processing on the tuning images; write ONNX + spec.

    Returns
    -------
    dict
        ``history``, ``minutes``, ``params``, ``postprocess``, ``tune_metrics``, ``model``.

    Examples
    --------
    >>> train_smear("../shared/data/bccd", "/tmp/smear", max_minutes=25)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    rng = loop.begin(seed, threads)
    data_dirs = [data_dirs] if isinstance(data_dirs, str | Path) else list(data_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, tune_set, val_stems = load_training_data(data_dirs, limit=limit)
    log.info("data: %d training, %d tuning images (%d validation images untouched)",
             len(train_set), len(tune_set), len(val_stems))
    net = build_net(widths, head_channels)
    div = net.size_divisor
    recipe = SmearRecipe(CropSampler(train_set, crop=crop), batch_size, tune_set, div)
    run, params = loop.train_dense(
        net, recipe, out_dir, warmup_cap=150, lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
        rng=rng, max_minutes=max_minutes, ema_decay=ema_decay, resume=resume,
        config={"widths": list(widths), "head_channels": head_channels, "seed": seed,
                "batch_size": batch_size, "crop_px": crop, "lr": lr})
    ema, history, minutes = run.model, run.rows, run.minutes
    postprocess, tune_metrics = dict(DEFAULT_POSTPROCESS), {}
    if tune and tune_set:
        postprocess, tune_metrics = tune_postprocess(ema, tune_set, div)
    postprocess["stain_rule"] = dict(PLATELET_RULE)  # needs the image: applied by the engine
    result = {"history": history, "minutes": round(minutes, 1), "params": params,
              "postprocess": postprocess, "tune_metrics": tune_metrics, "model": ema}
    if export:
        extra = {
            "data_mpp_assumed": {"bccd": ds.BCCD_MPP},
            "train_images": len(train_set),
            "tune_images": [s.key for s in tune_set],
            "tune_metrics_model_grid": tune_metrics,
            "training": {"epochs": len(history), "steps_per_epoch": steps_per_epoch,
                         "batch_size": batch_size, "crop_px": crop, "seed": seed,
                         "threads": threads, "minutes": round(minutes, 1),
                         "widths": list(widths), "head_channels": head_channels,
                         "parameters": params},
        }
        export_model(ema, out_dir, check_images=[s.image for s in (tune_set or train_set)],
                     postprocess=postprocess, extra=extra)
        voc = [Path(d) for d in data_dirs if ds.is_voc_folder(Path(d))]
        if voc:
            try:
                add_red_cell_probe(out_dir, voc[0], threads=threads)
            except ValueError as err:  # an undertrained model: fields without µm/px get assumed
                log.warning("no red-cell probe: %s", err)
    log.info("done in %.1f min training (%.1f min this session)", minutes,
             (time.perf_counter() - t_start) / 60)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m napari_hemato.train.smear",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, action="append",
                   help="BCCD-layout folder or export folder (repeatable)")
    p.add_argument("--out", required=True, help="model folder to write")
    add_schedule_options(p, train_smear)
    p.add_argument("--limit", type=int, default=None, help="images per folder (smoke runs)")
    p.add_argument("--no-eval", action="store_true", help="skip the validation run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train_smear(args.data, args.out, **schedule_options(args), limit=args.limit)
    if not args.no_eval:
        from napari_hemato.train.evaluate_smear import evaluate_smear

        for d in args.data:
            if ds.is_voc_folder(d):
                metrics = evaluate_smear(args.out, d, threads=args.threads)
                (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                log.info("validation: %s", {k: metrics["per_class"][k]["f1"] for k in ds.CLASS_NAMES})
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
