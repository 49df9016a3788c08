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
  mitosis-free), after a third of the epochs half of them around the strongest
  false detections of the current model (hard negatives).

Augmentation: scale ±15 %, rot90/flips, resolution loss (down-up sampling by
1.6–2.2), HED stain jitter, brightness/contrast/saturation, blur, JPEG 50–95.
The learning rate decays (cosine) with the step count or, when a time budget
(``--max-minutes``) binds first, with the clock. The checkpoint of the epoch
with the best validation F1 (tune slides' mosaics) is exported; the detection
threshold is the one maximising that F1.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from napari_hemato.core.postprocess import points_from_heatmap
from napari_hemato.models.spec import ModelSpec
from napari_hemato.train import data_mitosis as dm
from napari_hemato.train.common import (
    ColorAugment,
    cosine_lr,
    export_onnx,
    load_checkpoint,
    receptive_field_radius,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    step_bar,
)
from napari_hemato.train.evaluate_mitosis import sweep
from napari_hemato.train.mitosis_nets import (  # noqa: F401 (MitosisNet: public name)
    ARCHES,
    MitosisNet,
    MitosisOutputs,
    build_mitosis_net,
)

log = logging.getLogger(__name__)

NAME, VERSION = "hemato-mitosis-he", "0.1.0"
SIGMA_UM, IGNORE_UM, MARGIN_UM = 1.75, 10.0, 2.0
WINDOW_UM = (16.0, 20.0, 24.0)
MIN_DISTANCE_UM, HIT_UM = 7.5, 7.5


# -- batches ---------------------------------------------------------------------------------
class Sampler:
    """Draws augmented training batches (see the module docstring)."""

    def __init__(self, crops: dm.Crops, tissue: list[dm.TissueRegion], mpp: float, divisor: int,
                 *, p_surround: float = 0.125, p_tissue: float = 0.375, compose: int = 1,
                 norm=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))) -> None:
        self.crops, self.tissue, self.mpp = crops, [t.image for t in tissue], mpp
        self.compose = int(compose)
        if self.compose > 1:  # canvases of compose x compose windows of the largest size
            unit = max(8, int(round(max(WINDOW_UM) / mpp / 8)) * 8)
            if (unit * self.compose) % divisor:
                raise ValueError(f"{self.compose} x {unit} px canvases are not multiples of {divisor}")
            self.sizes = [unit]
        else:
            self.sizes = sorted({max(divisor, int(round(u / mpp / divisor)) * divisor)
                                 for u in WINDOW_UM})
        self.p_surround = p_surround
        self.p_tissue = p_tissue if self.tissue else 0.0
        areas = np.array([t.shape[0] * t.shape[1] for t in self.tissue], float)
        self.tissue_p = areas / areas.sum() if self.tissue else None
        self.hard: list[tuple[int, float, float]] = []
        self.color = ColorAugment(p_jpeg=0.5, jpeg_quality=(50, 95), p_blur=0.3,
                                  blur_sigma=(0.3, 1.5))
        self.sigma = SIGMA_UM / mpp
        self.mean = torch.tensor(norm[0]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(norm[1]).view(1, 3, 1, 1) * 255

    def batch(self, n: int, rng: np.random.Generator):
        """``n`` inputs: windows, or (``compose`` > 1) canvases of compose² windows.

        A canvas tiles independently drawn windows (positives with the figure
        anywhere, crop surroundings, tissue), so the network trains on inputs
        large enough for its receptive field while every figure still sits at
        a random place relative to the window seams.
        """
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        k = self.compose
        items = []
        for _ in range(n * k * k):
            u = rng.random()
            if u < self.p_tissue:
                items.append(self._tissue(size, rng))
            elif u < self.p_tissue + self.p_surround:
                items.append(self._crop(size, rng, surround=True))
            else:
                items.append(self._crop(size, rng, surround=False))
        img = torch.stack([i[0] for i in items])
        heat, mask, cls = (torch.stack([torch.from_numpy(i[j]) for i in items]) for j in (1, 2, 3))
        if k > 1:
            img, heat, mask, cls = (_tile(a, n, k) for a in (img, heat, mask, cls))
        img = _degrade(img, rng)
        img = self.color(img, rng)
        x = (img - self.mean) / self.std
        return x, heat[:, None], mask[:, None], cls

    def _window(self, img, y0, x0, win, size, rng, point=None):
        t = torch.from_numpy(np.ascontiguousarray(img[y0 : y0 + win, x0 : x0 + win]))
        t = t.permute(2, 0, 1).float()
        if win != size:
            t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=win > size)[0]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        t = torch.rot90(t, k, dims=(1, 2))
        if flip:
            t = torch.flip(t, dims=(2,))
        if point is not None:
            f = size / win
            y, x = (point[0] - y0 + 0.5) * f - 0.5, (point[1] - x0 + 0.5) * f - 0.5
            for _ in range(k):  # rot90 (counter-clockwise): (y, x) -> (size-1-x, y)
                y, x = size - 1 - x, y
            if flip:
                x = size - 1 - x
            point = (y, x)
        return t.contiguous(), point

    def _scale_win(self, size, rng, limit):
        s = math.exp(rng.uniform(math.log(0.85), math.log(1.15)))
        return int(min(limit, max(8, round(size / s))))

    def _crop(self, size, rng, surround):
        i = int(rng.integers(len(self.crops)))
        img = self.crops.images[i]
        h = img.shape[0]
        cy, cx = self.crops.centres[i]
        win = self._scale_win(size, rng, h)
        margin = MARGIN_UM / self.mpp * win / size
        if surround:  # the figure within 2 µm of the window's border (or on it)
            y0, x0 = self._edge_origin(cy, cx, win, h, margin, rng)
            surround = y0 is not None
        if not surround:
            y0 = self._origin(cy, win, h, margin, rng)
            x0 = self._origin(cx, win, h, margin, rng)
        t, (py, px) = self._window(img, y0, x0, win, size, rng, point=(cy, cx))
        d2 = _dist2(size, py, px)
        if surround:
            heat = np.zeros((size, size), np.float32)
            mask = (d2 > (IGNORE_UM / self.mpp) ** 2).astype(np.float32)
            cls = np.full((size, size), -1, np.int64)
        else:
            heat = np.exp(-d2 / (2 * self.sigma**2)).astype(np.float32)
            mask = np.ones((size, size), np.float32)
            cls = np.where(heat > 0.1, int(self.crops.labels[i]), -1).astype(np.int64)
        return t, heat, mask, cls

    @staticmethod
    def _origin(c, win, h, margin, rng) -> int:
        lo, hi = max(0.0, c - win + 1 + margin), min(h - win, c - margin)
        if hi <= lo:
            return int(np.clip(round(c - win / 2), 0, h - win))
        return int(np.clip(np.floor(rng.uniform(lo, hi + 1)), 0, h - win))

    @staticmethod
    def _edge_origin(cy, cx, win, h, margin, rng):
        origins = np.arange(h - win + 1)
        cands = []
        for axis, c in ((0, cy), (1, cx)):
            p = c - origins
            near = origins[(p <= margin) | (p >= win - 1 - margin)]
            cands += [(axis, int(v)) for v in near]
        if not cands:
            return None, None
        axis, v = cands[int(rng.integers(len(cands)))]
        other = int(rng.integers(0, h - win + 1))
        return (v, other) if axis == 0 else (other, v)

    def _tissue(self, size, rng):
        hard = self.hard and rng.random() < 0.5
        if hard:
            r, y, x = self.hard[int(rng.integers(len(self.hard)))]
            img = self.tissue[r]
        else:
            img = self.tissue[int(rng.choice(len(self.tissue), p=self.tissue_p))]
        h, w = img.shape[:2]
        win = self._scale_win(size, rng, min(h, w))
        for _ in range(5):
            if hard:
                y0 = int(np.clip(y - rng.uniform(0.15, 0.85) * win, 0, h - win))
                x0 = int(np.clip(x - rng.uniform(0.15, 0.85) * win, 0, w - win))
            else:
                y0, x0 = int(rng.integers(0, h - win + 1)), int(rng.integers(0, w - win + 1))
            if hard or dm.tissue_mask(img[y0 : y0 + win : 4, x0 : x0 + win : 4]).mean() > 0.3:
                break
        t, _ = self._window(img, y0, x0, win, size, rng)
        z = np.zeros((size, size), np.float32)
        return t, z, np.ones_like(z), np.full((size, size), -1, np.int64)


def _tile(a: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(n*k*k, ..., s, s) windows -> (n, ..., k*s, k*s) canvases, row-major."""
    s = a.shape[-1]
    a = a.reshape(n, k, k, *a.shape[1:])  # (n, k, k, [C,] s, s)
    lead = a.shape[3:-2]
    a = a.permute(0, *range(3, 3 + len(lead)), 1, -2, 2, -1)  # (n, [C,] k, s, k, s)
    return a.reshape(n, *lead, k * s, k * s).contiguous()


def _dist2(size, py, px):
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    return (yy - py) ** 2 + (xx - px) ** 2


def _degrade(img: torch.Tensor, rng, p: float = 0.25) -> torch.Tensor:
    """Lose resolution (down then up sampling) in a fraction of the batch, like 20× scans."""
    out = img.clone()
    size = img.shape[-1]
    for k in range(len(img)):
        if rng.random() < p:
            small = max(8, int(round(size / rng.uniform(1.6, 2.2))))
            t = F.interpolate(img[k : k + 1], size=(small, small), mode="bilinear",
                              align_corners=False, antialias=True)
            out[k] = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out


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
    mean = torch.tensor(net.norm[0]).view(1, 3, 1, 1)
    std = torch.tensor(net.norm[1]).view(1, 3, 1, 1)
    heat = np.zeros((hp, wp), np.float32)
    probs = None
    for y in range(0, hp, ty):
        for x in range(0, wp, tx):
            win = padded[y : y + ty + 2 * halo, x : x + tx + 2 * halo]
            t = torch.from_numpy(np.ascontiguousarray(win)).permute(2, 0, 1)[None].float() / 255
            hm, pr = MitosisOutputs(net)((t - mean) / std)
            if probs is None:
                probs = np.zeros((pr.shape[1], hp, wp), np.float32)
            heat[y : y + ty, x : x + tx] = hm[0, 0, halo:-halo, halo:-halo].numpy()
            probs[:, y : y + ty, x : x + tx] = pr[0, :, halo:-halo, halo:-halo].numpy()
    return heat[:h, :w], probs[:, :h, :w]


def validate(net: nn.Module, mosaics: list[dm.Mosaic], mpp: float) -> dict:
    """Best-threshold F1 (7.5 µm hits) of ``net`` on validation mosaics."""
    dets = []
    for m in mosaics:
        heat, probs = dense_predict(net, m.image)
        coords, scores = points_from_heatmap(heat, threshold=0.05,
                                             min_distance_px=MIN_DISTANCE_UM / mpp)
        iy, ix = np.rint(coords).astype(int).T if len(coords) else (np.zeros(0, int),) * 2
        dets.append({"coords": coords, "scores": scores, "classes": probs[:, iy, ix].argmax(0)})
    rows = sweep(dets, [m.points for m in mosaics], [m.labels for m in mosaics], HIT_UM / mpp)
    best = max(rows, key=lambda r: (r["f1"], -abs(r["threshold"] - 0.5)))
    return best


def mine_hard_negatives(net: nn.Module, tissue: list[dm.TissueRegion], *, threshold: float = 0.3,
                        top: int = 1000) -> list[tuple[int, float, float]]:
    """The ``top`` strongest detections on negative tissue as (region, y, x)."""
    found = []
    for r, region in enumerate(tissue):
        heat, _ = dense_predict(net, region.image)
        coords, scores = points_from_heatmap(heat, threshold=threshold,
                                             min_distance_px=MIN_DISTANCE_UM / region.mpp)
        found += [(float(s), r, float(y), float(x)) for (y, x), s in zip(coords, scores, strict=True)]
    found.sort(reverse=True)
    return [(r, y, x) for _, r, y, x in found[:top]]


# -- training --------------------------------------------------------------------------------
def load_data(data_dir, mpp: float, *, fraction: float = dm.VAL_FRACTION):
    """Crops (all sources) at ``mpp``, the slide split and train/val tissue regions."""
    frame = dm.read_crops_table(data_dir)
    crops = dm.Crops.concat([dm.load_crops(frame, mpp=mpp), dm.load_points_crops(data_dir, mpp=mpp)])
    if len(crops) == 0:
        raise FileNotFoundError(f"{data_dir}: no crops.csv (AMi-Br layout) or points.csv found")
    split = dm.split_slides(crops.slides, crops.datasets, fraction=fraction)
    tissue = {p: dm.tissue_regions(data_dir, part=p, mpp=mpp) for p in ("train", "val")}
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
    torch.set_num_threads(threads)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    crops, split, tissue = load_data(data_dir, mpp)
    train = crops.subset(np.isin(crops.slides, split["train"]))
    tune = crops.subset(np.isin(crops.slides, split["tune"]))
    log.info("crops: %d train (%d slides), %d tune (%d slides), test slides %d; tissue %d+%d",
             len(train), len(split["train"]), len(tune), len(split["tune"]), len(split["test"]),
             len(tissue["train"]), len(tissue["val"]))
    pick = np.random.default_rng(seed + 7).permutation(len(tune))[:val_crops]
    size = int(round(mosaic_um / mpp))
    room = (size // (crops.images.shape[1] + 24)) ** 2  # crop-sized spots that always fit
    mosaics = dm.make_mosaics(tune.subset(np.sort(pick)), [t.image for t in tissue["val"]],
                              size=size, per_mosaic=max(1, min(8, room - 2)),
                              decoys=max(0, min(2, room - 1)), block=int(round(64 / mpp)),
                              seed=seed + 1) if len(tune) else []
    net = build_mitosis_net(arch, widths=widths, pretrained=pretrained)
    compose = compose or (2 if arch == "effnet" else 1)
    sampler = Sampler(train, tissue["train"], mpp, net.size_divisor, compose=compose, norm=net.norm)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr,
                            weight_decay=1e-4)
    freq = np.bincount(train.labels, minlength=2).astype(float) + 1
    class_weights = torch.tensor(freq.sum() / (2 * freq), dtype=torch.float32)
    n_pos = batch_size * compose**2 * (1 - sampler.p_tissue - sampler.p_surround)
    steps_per_epoch = steps_per_epoch or max(1, int(math.ceil(len(train) / n_pos)))
    total = epochs * steps_per_epoch
    state = {"epoch": 0, "history": [], "best": None, "elapsed": 0.0}
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        saved = load_checkpoint(ckpt)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        set_rng_state(rng, saved["rng"])
        sampler.hard = saved["hard"]
        state = saved["state"]
        log.info("resumed from %s at epoch %d", ckpt, state["epoch"])
    budget = None if max_minutes is None else 60 * max_minutes
    t_run = time.perf_counter() - state["elapsed"]
    stopped = False
    for epoch in range(state["epoch"], epochs):
        net.train()
        sums = np.zeros(2)
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mitosis-batch")
        pending = pool.submit(sampler.batch, batch_size, rng)
        bar = step_bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}")
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            progress = step / total
            if budget:  # the schedule follows the clock when the time budget binds first
                progress = max(progress, (time.perf_counter() - t_run) / budget)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, progress, lr, warmup=100)
            x, heat, mask, cls = pending.result()
            if k + 1 < steps_per_epoch:  # prepare the next batch while this one trains
                pending = pool.submit(sampler.batch, batch_size, rng)
            lh, lc = loss_fn(net(x), heat, mask, cls, class_weights)
            opt.zero_grad()
            (lh + 0.5 * lc).backward()
            opt.step()
            sums += [float(lh.detach()), float(lc.detach())]
            bar.update()
            if budget and time.perf_counter() - t_run > budget:
                stopped = True
                break
        bar.close()
        pending.result()
        pool.shutdown()
        row = {"epoch": epoch, "loss_heat": sums[0] / (k + 1), "loss_class": sums[1] / (k + 1),
               "steps": k + 1, "lr": opt.param_groups[0]["lr"],
               "train_s": round(time.perf_counter() - t0, 1)}
        if mosaics:
            row["val"] = validate(net, mosaics, mpp)
            score = row["val"]["f1"] + 0.1 * np.nan_to_num(row["val"]["class_balanced_accuracy"])
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"score": float(score), "epoch": epoch, "val": row["val"],
                                 "model": copy.deepcopy(net.state_dict())}
        if mine and sampler.tissue and not stopped and (epoch + 1) % 3 == 0:
            sampler.hard = mine_hard_negatives(net, tissue["train"])
            row["hard_negatives"] = len(sampler.hard)
        row["elapsed_s"] = round(time.perf_counter() - t_run, 1)
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["elapsed"] = time.perf_counter() - t_run
        v = row.get("val", {})
        log.info("epoch %d/%d: loss %.4f + %.4f, val F1 %.3f (P %.3f R %.3f @ %.3f), atypical bal.acc "
                 "%.3f, %.0fs (total %.1f min)", epoch + 1, epochs, row["loss_heat"],
                 row["loss_class"], v.get("f1", float("nan")), v.get("precision", float("nan")),
                 v.get("recall", float("nan")), v.get("threshold", float("nan")),
                 v.get("class_balanced_accuracy", float("nan")), row["train_s"],
                 row["elapsed_s"] / 60)
        save_checkpoint(ckpt, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                               "rng": rng_state(rng), "hard": sampler.hard, "state": state})
        if stopped:
            log.info("time budget of %.1f min reached after epoch %d", max_minutes, epoch + 1)
            break
    best = state["best"]
    if best is not None:
        net.load_state_dict(best["model"])
    threshold = float(best["val"]["threshold"]) if best else 0.5
    result = {"model": net.eval(), "history": state["history"], "split": split,
              "best": None if best is None else {k: v for k, v in best.items() if k != "model"},
              "train_minutes": round(state["elapsed"] / 60, 2), "stopped_early": stopped}
    if export:
        result["spec"] = export_model(net, out, mpp=mpp, threshold=threshold, split=split,
                                      training={**_training_info(result, epochs, seed, threads,
                                                                 batch_size, steps_per_epoch,
                                                                 len(train), t_start),
                                                "arch": arch, "compose": compose, "lr": lr,
                                                **({"widths": list(widths)} if arch == "small" else {}),
                                                "pretrained": pretrained and arch == "effnet"})
    return result


def _training_info(result, epochs, seed, threads, batch_size, steps, n_train, t_start):
    return {"epochs_planned": epochs, "epochs_run": len(result["history"]), "seed": seed,
            "threads": threads, "batch_size": batch_size, "steps_per_epoch": steps,
            "train_crops": n_train,
            "train_minutes": result["train_minutes"], "stopped_early": result["stopped_early"],
            "best_epoch": None if result["best"] is None else result["best"]["epoch"],
            "wall_minutes_incl_loading": round((time.perf_counter() - t_start) / 60, 2)}


def export_model(net: nn.Module, out, *, mpp: float, threshold: float, split: dict,
                 training: dict | None = None) -> ModelSpec:
    """Write ``model.onnx`` (checked against torch) and ``model.json`` into ``out``."""
    out = Path(out)
    d = net.size_divisor
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, 4 * d, 4 * d, generator=gen)
    check = [torch.randn(2, 3, 3 * d, 5 * d, generator=gen)]
    wrapper = MitosisOutputs(net).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is chosen on purpose
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        worst = export_onnx(wrapper, out / "model.onnx", output_names=["heatmap", "class_probs"],
                            example=example, check_inputs=check)
    rf = receptive_field_radius(net, size=max(768, 8 * d))
    spec = ModelSpec(
        name=NAME, version=VERSION, task="mitosis", kind="points", class_names=dm.CLASS_NAMES,
        outputs={"heatmap": "heatmap", "class_probs": "class_probs"}, mpp=float(mpp),
        tile=1536 if rf > 128 else 1024,  # a large receptive field wants large tiles
        max_object_um=15.0, receptive_field_px=int(rf), size_divisor=int(d), pad_value=255,
        input_name="image",
        normalization={"scale": 1 / 255, "mean": list(net.norm[0]), "std": list(net.norm[1])},
        postprocess={"threshold": round(float(threshold), 3), "min_distance_um": MIN_DISTANCE_UM,
                     "radius_um": 5.0},
        extra={
            "validation_slides": {"tune": split["tune"], "test": split["test"]},
            "split": {"fraction": dm.VAL_FRACTION, "seed": dm.SPLIT_SEED,
                      "rule": "per dataset, seeded permutation of sorted slide ids; held-out "
                              "slides dealt alternately to tune (threshold, checkpoint) and test"},
            "target": {"sigma_um": SIGMA_UM, "window_um": list(WINDOW_UM)},
            "data": "AMi-Br crops (no licence upstream: research only, not shipped) + unlabelled "
                    "H&E negatives",
            "onnx_max_abs_diff": worst,
            "training": training or {},
        },
    )
    spec.save(out)
    return spec


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
    p.add_argument("--arch", choices=ARCHES, default="effnet",
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
