"""Train the mitosis detector (points + normal/atypical) and export it to ONNX.

Run ``python -m napari_hemato.train.mitosis --data ../shared/data --out MODEL_DIR``.

Inputs are windows of 16–24 µm (64–96 px at 0.25 µm/px), one size per step:

- positives: a window of an AMi-Br crop with the figure at a random place (at
  least 2 µm from the border); target a Gaussian blob (σ = 1.75 µm) at the figure,
  class target its normal/atypical label (majority vote);
- crop surroundings: windows of a crop whose figure lies at the window's border
  (only possible for the smallest windows); the 10 µm around the figure are
  ignored, the rest is negative;
- tissue negatives: windows of H&E images without labels (not verified
  mitosis-free; :func:`data_mitosis.tissue_sources`, DSB 2018 tissue included),
  from the second epoch on, every second epoch, half of them around the
  strongest false detections of the current model (hard negatives).

Augmentation: scale ±15 %, rot90/flips, resolution loss (down-up sampling by
1.6–2.2), HED stain jitter (±15 %; in 30 % of them eosin cut to 0.2–1×),
brightness/contrast/saturation, blur, JPEG 50–95.
The learning rate decays (cosine) with the step count or, when a time budget
(``--max-minutes``) binds first, with the clock.

Each epoch is scored on held-out data: the tune slides' crops pasted on tune
tissue (mosaics) and the tune tissue alone. The *budget threshold* is the
lowest at which the tune tissue carries at most ``FP_BUDGET_PER_MM2`` false
detections per mm²; the epoch's score is the mosaics' figure recall at that
threshold (+ 0.1 × normal/atypical balanced accuracy), so the exported
checkpoint is the one that finds most figures while staying quiet on tissue.
The threshold exported with it (the higher of the budget threshold and the
mosaics' F1-best one) is then replaced through the runtime path by
:func:`napari_hemato.train.mitosis_threshold.calibrate_threshold`: the highest
threshold that keeps the tune slides' recall (each crop alone) at 0.95 with 95 %
confidence.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from napari_hemato.core.postprocess import points_from_heatmap
from napari_hemato.core.spec import ModelSpec
from napari_hemato.train import data_mitosis as dm
from napari_hemato.train import loop
from napari_hemato.train.common import normalize, receptive_field_radius
from napari_hemato.train.evaluate_mitosis import FP_BUDGET_PER_MM2, budget_threshold, sweep
from napari_hemato.train.mitosis_batches import SIGMA_UM, WINDOW_UM, Sampler
from napari_hemato.train.mosaics import Mosaic, make_mosaics
from napari_hemato.train.nets import (  # noqa: F401 (MitosisNet: public name)
    MITOSIS_ARCHES,
    MitosisNet,
    MitosisOutputs,
    build_mitosis_net,
)

log = logging.getLogger(__name__)

NAME, VERSION = "hemato-mitosis-he", "0.2.0"
#: stain jitter of the training windows (see the module docstring)
COLOR = {"hed_sigma": 0.15, "hed_shift": 0.04, "p_eosin": 0.3, "eosin_range": (0.2, 1.0)}
MIN_DISTANCE_UM, HIT_UM = 7.5, 7.5


def loss_fn(z, heat, mask, cls, class_weights, pos_weight: float = 20.0):
    """Weighted BCE on the heatmap + class-balanced cross-entropy near figures."""
    w = mask * (1 + pos_weight * heat)
    bce = F.binary_cross_entropy_with_logits(z[:, :1], heat, reduction="none")
    lh = (bce * w).sum() / w.sum().clamp(min=1)
    valid = cls >= 0
    if not valid.any():
        return lh, z.new_zeros(())
    ce = F.cross_entropy(z[:, 1:], cls.clamp(min=0), reduction="none")
    cw = class_weights[cls.clamp(min=0)] * heat[:, 0] * valid
    return lh, (ce * cw).sum() / cw.sum().clamp(min=1e-6)


# -- dense prediction, validation, hard negatives ----------------------------------------------
@torch.no_grad()
def dense_predict(net: nn.Module, img: np.ndarray, *, tile: int = 1024, halo: int = 96
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap (H, W) and class probabilities (C, H, W) of a uint8 RGB image, tiled.

    ``tile`` and ``2 * halo`` must be multiples of the net's size divisor.
    """
    net.eval()
    h, w = img.shape[:2]
    ty, tx = min(tile, -(-h // 64) * 64), min(tile, -(-w // 64) * 64)
    hp, wp = -(-h // ty) * ty, -(-w // tx) * tx
    padded = np.pad(img, ((halo, hp - h + halo), (halo, wp - w + halo), (0, 0)), constant_values=255)
    heat = np.zeros((hp, wp), np.float32)
    probs = None
    for y in range(0, hp, ty):
        for x in range(0, wp, tx):
            win = padded[y : y + ty + 2 * halo, x : x + tx + 2 * halo]
            t = torch.from_numpy(np.ascontiguousarray(win)).permute(2, 0, 1)[None].float()
            hm, pr = MitosisOutputs(net)(normalize(t, net.normalization))
            if probs is None:
                probs = np.zeros((pr.shape[1], hp, wp), np.float32)
            heat[y : y + ty, x : x + tx] = hm[0, 0, halo:-halo, halo:-halo].numpy()
            probs[:, y : y + ty, x : x + tx] = pr[0, :, halo:-halo, halo:-halo].numpy()
    return heat[:h, :w], probs[:, :h, :w]


def tissue_detections(net: nn.Module, tissue: list[dm.TissueRegion], threshold: float):
    """``(index, coords, scores)`` of ``net``'s detections on each tissue region."""
    for r, region in enumerate(tissue):
        heat, _ = dense_predict(net, region.image)
        coords, scores = points_from_heatmap(heat, threshold=threshold,
                                             min_distance_px=MIN_DISTANCE_UM / region.mpp)
        yield r, coords, np.asarray(scores, float)


def tissue_scores(net: nn.Module, tissue: list[dm.TissueRegion]) -> tuple[np.ndarray, float]:
    """Detection scores (threshold 0.05) on mitosis-poor tissue and its area in mm²."""
    scores = [s for _, _, s in tissue_detections(net, tissue, 0.05)]
    mm2 = sum(dm.tissue_mm2(region.image, region.mpp) for region in tissue)
    return (np.concatenate(scores) if scores else np.zeros(0)), mm2


def validate(net: nn.Module, mosaics: list[Mosaic], mpp: float,
             tissue: list[dm.TissueRegion] | None = None, budget: float = FP_BUDGET_PER_MM2) -> dict:
    """Best-threshold F1 (7.5 µm hits) of ``net`` on validation mosaics.

    With ``tissue``, also ``budget``: the mosaics' detection at the lowest
    threshold keeping ``tissue`` within ``budget`` false detections per mm².
    """
    dets = []
    for m in mosaics:
        heat, probs = dense_predict(net, m.image)
        coords, scores = points_from_heatmap(heat, threshold=0.05,
                                             min_distance_px=MIN_DISTANCE_UM / mpp)
        iy, ix = np.rint(coords).astype(int).T if len(coords) else (np.zeros(0, int),) * 2
        dets.append({"coords": coords, "scores": scores, "classes": probs[:, iy, ix].argmax(0)})
    rows = sweep(dets, [m.points for m in mosaics], [m.labels for m in mosaics], HIT_UM / mpp)
    best = max(rows, key=lambda r: (r["f1"], -abs(r["threshold"] - 0.5)))
    if tissue:
        scores, mm2 = tissue_scores(net, tissue)
        t = budget_threshold(scores, mm2, budget)
        at = next(r for r in rows if r["threshold"] == t)
        best = {**best, "budget": {**at, "tissue_per_mm2": float((scores >= t).sum() / mm2),
                                   "tissue_mm2": round(mm2, 4), "budget_per_mm2": budget}}
    return best


class MitosisRecipe(loop.Recipe):
    """:class:`Sampler` batches (prefetched); mosaic F1 picks the epoch; hard negatives mined."""

    prefetch = True

    def __init__(self, sampler: Sampler, batch_size: int, class_weights: torch.Tensor, mosaics,
                 mpp: float, tissue: list[dm.TissueRegion], mine: bool,
                 tune_tissue: list[dm.TissueRegion] | None = None) -> None:
        self.sampler, self.batch_size, self.class_weights = sampler, batch_size, class_weights
        self.mosaics, self.mpp, self.tissue, self.mine = mosaics, mpp, tissue, mine
        self.tune_tissue = tune_tissue or []

    def batch(self, rng):
        return self.sampler.batch(self.batch_size, rng)

    def loss(self, net, batch):
        x, heat, mask, cls = batch
        lh, lc = loss_fn(net(x), heat, mask, cls, self.class_weights)
        return {"loss": lh + 0.5 * lc, "loss_heat": lh, "loss_class": lc}

    def evaluate(self, net) -> dict:
        if not self.mosaics:
            return {}
        return {"val": validate(net, self.mosaics, self.mpp, self.tune_tissue)}

    def score(self, row: dict) -> float | None:
        v = row.get("val")
        if v is None:
            return None
        at = v.get("budget", v)  # recall within the tissue budget, else the best F1
        key = "recall" if "budget" in v else "f1"
        return at[key] + 0.1 * float(np.nan_to_num(at["class_balanced_accuracy"]))

    def end_epoch(self, net, row: dict, *, stopped: bool) -> None:
        if self.mine and self.sampler.tissue and not stopped and (row["epoch"] + 1) % 2 == 0:
            self.sampler.hard = mine_hard_negatives(net, self.tissue)
            row["hard_negatives"] = len(self.sampler.hard)

    def state(self) -> dict:
        return {"hard": [list(h) for h in self.sampler.hard]}

    def load_state(self, state: dict) -> None:
        self.sampler.hard = [tuple(h) for h in state["hard"]]


def mine_hard_negatives(net: nn.Module, tissue: list[dm.TissueRegion], *, threshold: float = 0.3,
                        top: int = 2000) -> list[tuple[int, float, float]]:
    """The strongest detections on negative tissue as (region, y, x): ``top`` shared equally
    among the tissue groups (a group's unused share goes to the others), so the group
    with the most false detections does not take every hard negative."""
    by_group: dict[str, list] = {}
    for r, coords, scores in tissue_detections(net, tissue, threshold):
        group = tissue[r].source.group or tissue[r].source.key
        by_group.setdefault(group, []).extend(
            (float(s), r, float(y), float(x)) for (y, x), s in zip(coords, scores, strict=True))
    for found in by_group.values():
        found.sort(reverse=True)
    picked, left, groups = [], top, sorted(by_group, key=lambda g: len(by_group[g]))
    for i, g in enumerate(groups):  # smallest first: their unused share passes on
        take = by_group[g][: left // (len(groups) - i)]
        picked += take
        left -= len(take)
    return [(r, y, x) for _, r, y, x in picked]


# -- training --------------------------------------------------------------------------------
def load_data(data_dir, mpp: float, *, fraction: float = dm.VAL_FRACTION):
    """Crops (all sources) at ``mpp``, the slide split and train/val tissue regions."""
    frame = dm.read_crops_table(data_dir)
    crops = dm.Crops.concat([dm.load_crops(frame, mpp=mpp), dm.load_points_crops(data_dir, mpp=mpp)])
    if len(crops) == 0:
        raise FileNotFoundError(f"{data_dir}: no crops.csv (AMi-Br layout) or points.csv found")
    split = dm.split_slides(crops.slides, crops.datasets, fraction=fraction)
    tissue = {p: dm.tissue_regions(data_dir, part=p, mpp=mpp) for p in ("train", "tune", "test")}
    return crops, split, tissue


def train_mitosis(
    data_dir, out, *, epochs: int = 30, seed: int = 0, threads: int = 2, resume: bool = False,
    max_minutes: float | None = None, batch_size: int = 32, steps_per_epoch: int | None = None,
    mpp: float = 0.25, widths=(16, 32, 64, 96), lr: float = 2e-3, val_crops: int = 128,
    mosaic_um: float = 256.0, mine: bool = True, export: bool = True, arch: str = "small",
    compose: int | None = None, pretrained: bool = True,
) -> dict:
    """Train (or resume) the mitosis detector and export the best epoch to ``out``.

    ``arch`` is ``"effnet"`` (ImageNet-initialised EfficientNet-Lite0 trunk; the
    command line's default) or ``"small"`` (from scratch; ``widths``).
    ``compose`` windows per canvas side (default 2 for effnet, 1 for small);
    ``batch_size`` counts inputs (canvases).

    Returns a dict with ``model`` (the best net), ``history``, ``split`` and
    ``best`` (validation metrics of the exported epoch).
    """
    t_start = time.perf_counter()
    rng = loop.begin(seed, threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    crops, split, tissue = load_data(data_dir, mpp)
    train = crops.subset(np.isin(crops.slides, split["train"]))
    tune = crops.subset(np.isin(crops.slides, split["tune"]))
    log.info("crops: %d train (%d slides), %d tune (%d slides), test slides %d; tissue regions "
             "%d train, %d tune, %d test", len(train), len(split["train"]), len(tune),
             len(split["tune"]), len(split["test"]), len(tissue["train"]), len(tissue["tune"]),
             len(tissue["test"]))
    pick = np.random.default_rng(seed + 7).permutation(len(tune))[:val_crops]
    size = int(round(mosaic_um / mpp))
    room = (size // (crops.images.shape[1] + 24)) ** 2  # crop-sized spots that always fit
    mosaics = make_mosaics(tune.subset(np.sort(pick)), [t.image for t in tissue["tune"]],
                              size=size, per_mosaic=max(1, min(8, room - 2)),
                              decoys=max(0, min(2, room - 1)), block=int(round(64 / mpp)),
                              seed=seed + 1) if len(tune) else []
    net = build_mitosis_net(arch, widths=widths, pretrained=pretrained)
    compose = compose or (2 if arch == "effnet" else 1)
    sampler = Sampler(train, tissue["train"], mpp, net.size_divisor, compose=compose,
                      normalization=net.normalization, color=COLOR)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr,
                            weight_decay=1e-4)
    freq = np.bincount(train.labels, minlength=2).astype(float) + 1
    class_weights = torch.tensor(freq.sum() / (2 * freq), dtype=torch.float32)
    n_pos = batch_size * compose**2 * (1 - sampler.p_tissue - sampler.p_surround)
    steps_per_epoch = steps_per_epoch or max(1, int(math.ceil(len(train) / n_pos)))
    recipe = MitosisRecipe(sampler, batch_size, class_weights, mosaics, mpp, tissue["train"], mine,
                           tune_tissue=tissue["tune"])
    run = loop.train(net, opt, recipe, out, rng=rng, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     lr=lr, warmup=100, max_minutes=max_minutes, resume=resume,
                     config={"arch": arch, "compose": compose, "lr": lr, "batch_size": batch_size,
                             "seed": seed, "mpp": mpp})
    best = run.best
    threshold = 0.5
    if best:
        val = best["row"]["val"]
        threshold = max(float(val["threshold"]), float(val.get("budget", val)["threshold"]))
    result = {"model": run.model.eval(), "history": run.rows, "split": split,
              "best": None if best is None else {"score": best["score"], "epoch": best["epoch"],
                                                 "val": best["row"]["val"]},
              "train_minutes": round(run.minutes, 2), "stopped_early": run.stopped}
    if export:
        tissue_split = {k: [t.source.key for t in tissue[k]] for k in ("tune", "test")}
        result["spec"] = export_model(run.model, out, mpp=mpp, threshold=threshold, split=split,
                                      tissue_split=tissue_split,
                                      training={**_training_info(result, epochs, seed, threads,
                                                                 batch_size, steps_per_epoch,
                                                                 len(train), t_start),
                                                "arch": arch, "compose": compose, "lr": lr,
                                                **({"widths": list(widths)} if arch == "small" else {}),
                                                "pretrained": pretrained and arch == "effnet"})
        if len(tune):
            from napari_hemato.train.mitosis_threshold import calibrate_threshold

            result["threshold"] = calibrate_threshold(out, data_dir, threads=threads)
    return result


def _training_info(result, epochs, seed, threads, batch_size, steps, n_train, t_start):
    return {"epochs_planned": epochs, "epochs_run": len(result["history"]), "seed": seed,
            "threads": threads, "batch_size": batch_size, "steps_per_epoch": steps,
            "train_crops": n_train,
            "train_minutes": result["train_minutes"], "stopped_early": result["stopped_early"],
            "best_epoch": None if result["best"] is None else result["best"]["epoch"],
            "wall_minutes_incl_loading": round((time.perf_counter() - t_start) / 60, 2)}


def export_model(net: nn.Module, out, *, mpp: float, threshold: float, split: dict,
                 training: dict | None = None, tissue_split: dict | None = None) -> ModelSpec:
    """Write ``model.onnx`` (checked against torch), ``model.json`` and a card into ``out``."""
    d = net.size_divisor
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, 4 * d, 4 * d, generator=gen)
    check = [torch.randn(2, 3, 3 * d, 5 * d, generator=gen)]
    rf = receptive_field_radius(net, size=max(768, 8 * d))
    spec = dict(
        name=NAME, version=VERSION, task="mitosis", kind="points", class_names=dm.CLASS_NAMES,
        outputs={"heatmap": "heatmap", "class_probs": "class_probs"}, mpp=float(mpp),
        tile=1536 if rf > 128 else 1024,  # a large receptive field wants large tiles
        max_object_um=15.0, receptive_field_px=int(rf), size_divisor=int(d), pad_value=255,
        input_name="image", normalization=dict(net.normalization),
        postprocess={"threshold": round(float(threshold), 3), "min_distance_um": MIN_DISTANCE_UM,
                     "radius_um": 5.0},
        extra={
            "validation_slides": {"tune": split["tune"], "test": split["test"]},
            **({"validation_tissue": tissue_split} if tissue_split else {}),
            "threshold_rule": f"at export: max(tune-mosaic F1-best, lowest keeping tune tissue "
                              f"<= {FP_BUDGET_PER_MM2:g} detections/mm2); then extra.threshold",
            "split": {"fraction": dm.VAL_FRACTION, "seed": dm.SPLIT_SEED,
                      "rule": "per dataset, seeded permutation of sorted slide ids; held-out "
                              "slides dealt alternately to tune (threshold, checkpoint) and test"},
            "target": {"sigma_um": SIGMA_UM, "window_um": list(WINDOW_UM)},
            "data": "AMi-Br crops (no licence upstream: research only, not shipped) + unlabelled "
                    "H&E negatives",
            "training": training or {},
        },
    )
    return loop.export_model(MitosisOutputs(net).eval(), out, spec, example=example,
                             check_inputs=check)


def main(argv=None) -> int:
    """Command line: ``python -m napari_hemato.train.mitosis --data DIR --out MODEL_DIR``."""
    p = argparse.ArgumentParser(prog="napari_hemato.train.mitosis", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="../shared/data, or a folder with crops.csv "
                   "(AMi-Br layout) and/or points.csv files beside images")
    p.add_argument("--out", required=True, help="model folder (model.onnx, model.json, checkpoint)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")),
                   default=(16, 32, 64, 96))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-crops", type=int, default=128)
    p.add_argument("--no-mine", action="store_true", help="no hard-negative mining")
    p.add_argument("--arch", choices=MITOSIS_ARCHES, default="effnet",
                   help="effnet: ImageNet EfficientNet-Lite0 trunk (default); small: from scratch")
    p.add_argument("--compose", type=int, default=None,
                   help="windows per canvas side (default 2 for effnet, 1 for small)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = train_mitosis(a.data, a.out, epochs=a.epochs, seed=a.seed, threads=a.threads,
                           resume=a.resume, max_minutes=a.max_minutes, batch_size=a.batch_size,
                           steps_per_epoch=a.steps_per_epoch, mpp=a.mpp, widths=a.widths, lr=a.lr,
                           val_crops=a.val_crops, mine=not a.no_mine, arch=a.arch,
                           compose=a.compose)
    best = result["best"] or {}
    log.info("done: best epoch %s, val %s", best.get("epoch"), best.get("val"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
