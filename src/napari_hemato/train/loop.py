"""The one training loop of the trainers, and their one export path (torch; ``train`` extra).

A trainer brings its data, network and loss as a :class:`Recipe` (and, when it
has one, its per-epoch evaluation and the score that picks the exported
epoch); :func:`train` does the rest:

- epochs of steps; the learning rate warms up linearly, then decays (cosine, to
  2 %) with the larger of the step fraction and, under a time budget
  (``max_minutes``), the clock fraction, so a slow machine still anneals;
  training stops at the step that crosses the budget;
- optionally an EMA of the weights, which is then what is evaluated and exported;
- after every epoch: evaluation, best-epoch selection, a history row, a
  checkpoint without pickle (:mod:`napari_hemato.train.checkpoint`) and
  ``history.json``;
- ``resume``: continue from the checkpoint's epoch with the same weights,
  optimizer state, random streams, history and trainer state.

:func:`export_model` writes ``model.onnx`` (checked against torch),
``model.json`` (validated by :func:`~napari_hemato.core.spec.load_spec`) and a
generated ``MODEL_CARD.md``; :func:`dense_spec` and :func:`export_dense` do the
U-Nets' part of it.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_hemato.train import checkpoint as ck
from napari_hemato.train.common import (
    cosine_lr,
    ema_update,
    export_onnx,
    normalize,
    receptive_field_radius,
    seed_everything,
)

log = logging.getLogger(__name__)

CARD_MARK = "<!-- written by napari_hemato.train.loop.export_model; edit freely, then drop this line -->"


class Recipe:
    """What a trainer plugs into :func:`train`; override :meth:`batch` and :meth:`loss`.

    Every random draw of a step belongs in :meth:`batch` (with the ``rng`` it is
    given), so a resumed run draws the same batches. ``prefetch = True`` draws
    the next batch in a worker thread while the current one trains.
    """

    prefetch = False

    def batch(self, rng: np.random.Generator):
        """The next training batch (anything :meth:`loss` takes)."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch) -> dict[str, torch.Tensor]:
        """Named losses of one batch; ``"loss"`` is minimised, all are averaged into the row."""
        raise NotImplementedError

    def train_mode(self, net: nn.Module) -> None:
        """Put ``net`` in training mode (e.g. with frozen batch norms)."""
        net.train()

    def evaluate(self, net: nn.Module) -> dict:
        """Per-epoch metrics of the evaluated net (the EMA if there is one) for the row."""
        return {}

    def score(self, row: dict) -> float | None:
        """Selection metric of an epoch's row (higher is better); None: export the last epoch."""
        return None

    def end_epoch(self, net: nn.Module, row: dict, *, stopped: bool) -> None:
        """After evaluation and before the checkpoint (e.g. hard-negative mining)."""

    def state(self) -> dict:
        """JSON-able trainer state saved in the checkpoint."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""


@dataclass
class Run:
    """What :func:`train` returns."""

    net: nn.Module  #: the trained network (last step)
    model: nn.Module  #: the one to export: EMA or net, with the best epoch's weights
    history: dict  #: ``config``, ``stages``, ``epochs`` (rows), ``train_minutes``
    best: dict | None = None  #: ``score``, ``epoch`` and ``row`` of the selected epoch
    stopped: bool = False  #: the time budget ended training
    minutes: float = 0.0  #: training time, resumed sessions included
    rows: list = field(default_factory=list)


def begin(seed: int, threads: int) -> np.random.Generator:
    """Threads and seeds for a run; the numpy generator the batches draw from."""
    torch.set_num_threads(max(1, int(threads)))
    seed_everything(seed)
    return np.random.default_rng(seed)


def step_bar(total: int, desc: str):
    """A tqdm bar over an epoch's steps on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=None,
                dynamic_ncols=True, leave=False, mininterval=1.0)


def learning_rate(step: int, *, total: int, lr: float, warmup: int, clock: float = 0.0) -> float:
    """Warm-up then cosine; ``clock`` is the fraction of the time budget spent (0 without one)."""
    return cosine_lr(step, max((step - warmup) / max(total - warmup, 1), clock), lr, warmup)


def _summary(values: list[float]) -> float:
    return float(f"{float(np.mean(values)):.5g}")


def train(net: nn.Module, opt: torch.optim.Optimizer, recipe: Recipe, out_dir: str | Path, *,
          rng: np.random.Generator, epochs: int, steps_per_epoch: int, lr: float, warmup: int,
          max_minutes: float | None = None, ema_decay: float | None = None, resume: bool = False,
          config: dict | None = None) -> Run:
    """Train ``net`` with ``opt`` on ``recipe``'s batches; checkpoint each epoch into ``out_dir``.

    Raises
    ------
    ValueError
        ``resume`` with only a pickled ``checkpoint.pt`` of an earlier version.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ck.FILENAME
    ema = copy.deepcopy(net) if ema_decay is not None else None
    judged = ema if ema is not None else net
    config = dict(config or {})
    history = {"config": config, "stages": [], "epochs": []}
    start, elapsed_before, best, best_weights = 0, 0.0, None, None
    if resume and not path.exists() and (out_dir / ck.LEGACY_FILENAME).exists():
        ck.load_checkpoint(out_dir / ck.LEGACY_FILENAME)  # raises the explanation
    if resume and path.exists():
        tensors, state = ck.load_checkpoint(path)
        net.load_state_dict(ck.unprefixed("model", tensors))
        if ema is not None:
            ema.load_state_dict(ck.unprefixed("ema", tensors))
        ck.optimizer_from(opt, tensors, state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(tensors["rng.torch"])
        recipe.load_state(state["recipe"])
        history, start, elapsed_before = state["history"], state["epoch"], state["elapsed_s"]
        best = state["best"]
        best_weights = ck.unprefixed("best", tensors) or None
        if start < epochs:
            changed = {k: v for k, v in config.items() if history["config"].get(k) != v}
            history["stages"].append({"resumed_at_epoch": start, "epochs": epochs, **changed})
        log.info("resumed from %s at epoch %d/%d", path, start, epochs)
    total = epochs * steps_per_epoch
    budget = 60 * max_minutes if max_minutes else None
    t0 = time.perf_counter() - elapsed_before
    stopped = False
    for epoch in range(start, epochs):
        recipe.train_mode(net)
        parts: dict[str, list[float]] = {}
        te = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch") if recipe.prefetch else None
        pending = pool.submit(recipe.batch, rng) if pool else None
        bar = step_bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}")
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            clock = (time.perf_counter() - t0) / budget if budget else 0.0
            for g in opt.param_groups:
                g["lr"] = learning_rate(step, total=total, lr=lr, warmup=warmup, clock=clock)
            if pool:
                batch = pending.result()
                if k + 1 < steps_per_epoch:
                    pending = pool.submit(recipe.batch, rng)
            else:
                batch = recipe.batch(rng)
            losses = recipe.loss(net, batch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            if ema is not None:
                ema_update(ema, net, ema_decay if step > warmup else 0.0)
            for name, v in losses.items():
                parts.setdefault(name, []).append(float(v.detach()))
            bar.update()
            if k % 50 == 49:
                log.info("epoch %d step %d/%d loss %.4f", epoch + 1, k + 1, steps_per_epoch,
                         float(np.mean(parts["loss"][-50:])))
            if budget and time.perf_counter() - t0 > budget:
                stopped = True
                break
        bar.close()
        if pool:
            pending.result()
            pool.shutdown()
        row = {"epoch": epoch, **{n: _summary(v) for n, v in parts.items()}, "steps": k + 1,
               "lr": round(opt.param_groups[0]["lr"], 8), "epoch_s": round(time.perf_counter() - te, 1)}
        row.update(recipe.evaluate(judged))
        score = recipe.score(row)
        if score is not None and (best is None or score > best["score"]):
            best = {"score": float(score), "epoch": epoch, "row": row}
            best_weights = {n: t.detach().clone() for n, t in judged.state_dict().items()}
        recipe.end_epoch(net, row, stopped=stopped)
        elapsed = time.perf_counter() - t0
        row["minutes"] = round(elapsed / 60, 2)
        history["epochs"].append(row)
        history["train_minutes"] = round(elapsed / 60, 2)
        log.info("epoch %d/%d %s", epoch + 1, epochs, json.dumps(row))
        _save(path, net, ema, opt, rng, best_weights, {
            "epoch": epoch + 1, "elapsed_s": elapsed, "history": history, "best": best,
            "recipe": recipe.state()})
        (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        if stopped:
            log.warning("time budget of %.3g min reached in epoch %d", max_minutes, epoch + 1)
            break
    if best_weights is not None:
        judged.load_state_dict(best_weights)
    minutes = (time.perf_counter() - t0) / 60
    history["train_minutes"] = round(minutes, 2)
    return Run(net=net, model=judged, history=history, best=best, stopped=stopped,
               minutes=round(minutes, 2), rows=history["epochs"])


def train_dense(net: nn.Module, recipe: Recipe, out_dir: str | Path, *, warmup_cap: int,
                lr: float, epochs: int, steps_per_epoch: int, **kwargs) -> tuple[Run, int]:
    """:func:`train` as the nuclei and smear U-Nets run it; ``(run, parameter count)``.

    AdamW (weight decay 1e-4) on every weight, a warm-up of a tenth of the
    steps (at most ``warmup_cap``); ``kwargs`` go to :func:`train` (``rng``,
    ``ema_decay``, ``max_minutes``, ``resume``, ``config``).
    """
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    params = sum(p.numel() for p in net.parameters())
    log.info("%s: %d parameters", type(net).__name__, params)
    warmup = min(warmup_cap, max(epochs * steps_per_epoch // 10, 1))
    run = train(net, opt, recipe, out_dir, lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                warmup=warmup, **kwargs)
    return run, params


def _save(path, net, ema, opt, rng, best_weights, state) -> None:
    tensors = ck.prefixed("model", net.state_dict())
    if ema is not None:
        tensors |= ck.prefixed("ema", ema.state_dict())
    if best_weights is not None:
        tensors |= ck.prefixed("best", best_weights)
    opt_tensors, opt_json = ck.optimizer_to(opt)
    tensors |= opt_tensors | {"rng.torch": torch.get_rng_state()}
    ck.save_checkpoint(path, tensors, {**state, "optimizer": opt_json,
                                       "rng": rng.bit_generator.state})


# -- export ---------------------------------------------------------------------------
def export_model(wrapper: nn.Module, out_dir: str | Path, spec: dict, *, example: torch.Tensor,
                 check_inputs: Sequence[torch.Tensor] = (), spatial: bool = True):
    """Write ``model.onnx``, ``model.json`` and ``MODEL_CARD.md`` for an export ``wrapper``.

    ``spec`` holds the :class:`~napari_hemato.core.spec.ModelSpec` fields; its
    ``outputs`` values name the ONNX outputs in the wrapper's order.
    ``extra["onnx_max_abs_diff"]`` records the largest onnxruntime − torch difference.
    ``spatial``: H and W of the ONNX input are dynamic (else only N).

    Returns
    -------
    ModelSpec
        The spec as loaded back from ``out_dir``.
    """
    from napari_hemato.core.spec import ModelSpec, load_spec

    out_dir = Path(out_dir)
    worst = export_onnx(wrapper, out_dir / "model.onnx", input_name=spec.get("input_name", "image"),
                        output_names=list(spec["outputs"].values()), example=example,
                        check_inputs=check_inputs, spatial=spatial)
    fields = {**spec, "extra": {**spec.get("extra", {}), "onnx_max_abs_diff": float(f"{worst:.3g}")}}
    ModelSpec(**fields).save(out_dir)
    saved = load_spec(out_dir)  # validates
    write_card(out_dir, saved)
    return saved


def dense_spec(net: nn.Module, *, postprocess: dict, extra: dict, **fields) -> dict:
    """The ``model.json`` fields of a trained U-Net segmenting instances (nuclei, smear cells).

    Its size divisor and receptive field (at 512 px) are measured on ``net``; ``fields`` are
    the task's (``name``, ``version``, ``task``, ``mpp``, ``tile``, ``normalization``, ...;
    the ModelSpec defaults hold for the rest: RGB, white pad).
    """
    return {**fields, "kind": "instances", "receptive_field_px": receptive_field_radius(net, size=512),
            "size_divisor": net.size_divisor, "postprocess": dict(postprocess), "extra": extra}


def export_dense(wrapper: nn.Module, out_dir: str | Path, spec: dict, *, check_images=()):
    """:func:`export_model` for a fully-convolutional model (dynamic H, W).

    Checked on a random (2, 3, 2d, 3d) batch (``d`` the spec's ``size_divisor``)
    and on ``check_images``: uint8 (H, W, 3) images whose sides are multiples of ``d``.
    """
    d = spec["size_divisor"]
    example = torch.randn(2, 3, 2 * d, 3 * d, generator=torch.Generator().manual_seed(0))
    checks = [normalize(torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32)),
                        spec["normalization"]) for img in check_images]
    return export_model(wrapper, out_dir, spec, example=example, check_inputs=checks)


def write_card(out_dir: str | Path, spec) -> Path | None:
    """A generated ``MODEL_CARD.md`` from the spec; a hand-written card is left alone."""
    path = Path(out_dir) / "MODEL_CARD.md"
    if path.exists() and CARD_MARK not in path.read_text():
        log.info("%s is hand-written: not replaced", path)
        return None
    train = spec.extra.get("training", {})
    pixel = f"{spec.mpp} µm/px" if spec.mpp else f"{spec.input_size} px cell crops"
    lines = [
        CARD_MARK,
        f"# Model card: `{spec.name}` {spec.version} ({spec.task}, {spec.kind})",
        "",
        "Research use only; not a medical device. A person must check every result.",
        "",
        "| | |", "|---|---|",
        f"| input | `{spec.input_name}`: float32 NCHW RGB, normalisation {json.dumps(spec.normalization)} |",
        f"| pixel size | {pixel} |",
        f"| tile / halo | {spec.tile} px, size divisor {spec.size_divisor}, receptive field "
        f"{spec.receptive_field_px} px, max object {spec.max_object_um} µm |",
        f"| outputs | {', '.join(f'`{v}` ({k})' for k, v in spec.outputs.items())} |",
        f"| classes | {', '.join(spec.class_names)} |",
        f"| post-processing | {json.dumps(spec.postprocess) if spec.postprocess else '-'} |",
        f"| onnxruntime vs torch | max abs. difference {spec.extra.get('onnx_max_abs_diff')} |",
        "",
        "## Training",
        "",
        *(f"- {k}: {json.dumps(v, default=str)}" for k, v in train.items()
          if not isinstance(v, dict | list) or len(json.dumps(v, default=str)) < 200),
        "",
        "Validation and limitations: see `metrics.json` when the evaluation ran, and write them here.",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
