"""Fine-tuning the mitosis detector from corrected points, torch-free, on a tiny heatmap net
with the bundled model's head layout (the real model: benchmarks/bench_finetune_mitosis.py).

The tiny model calls every dark blob a figure; the synthetic lab's blue blobs are figures,
its red ones are mimics the user rejects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_hemato.api import analyze
from napari_hemato.core.annotations import from_result
from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.classes import REJECTED
from napari_hemato.core.errors import HematoError
from napari_hemato.finetune.common import FinetuneCancelled, Progress
from napari_hemato.finetune.features import HeatmapFeatures, add_features_output, sample_features
from napari_hemato.finetune.mitosis import finetune_mitosis
from napari_hemato.finetune.points_replay import write_points_replay
from napari_hemato.models.onnx_backend import OnnxPredictor
from napari_hemato.tasks import get_task

from .onnx_models import tiny_mitosis_model_dir

pytest.importorskip("onnx")
MPP = 0.5
BLUE, RED = (40, 30, 120), (140, 30, 40)  # a figure; a mimic the model also calls a figure
RADIUS = 8  # px


def field(rng, blobs, side: int = 320) -> np.ndarray:
    """A light noisy field with blobs ``[(y, x, colour)]``."""
    img = np.clip(rng.normal(235, 5, (side, side, 3)), 0, 255)
    yy, xx = np.mgrid[:side, :side]
    for y, x, colour in blobs:
        disc = (yy - y) ** 2 + (xx - x) ** 2 < RADIUS**2
        img[disc] = np.clip(rng.normal(colour, 6, (int(disc.sum()), 3)), 0, 255)
    return img.astype(np.uint8)


def grid_blobs(colours, side: int = 320, step: int = 64):
    places = [(y, x) for y in range(40, side - 30, step) for x in range(40, side - 30, step)]
    return [(y, x, c) for (y, x), c in zip(places, colours, strict=False)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny model with a features output and a replay of blue figures and background."""
    folder = tiny_mitosis_model_dir(tmp_path_factory.mktemp("m") / "mitosis")
    assert add_features_output(folder)
    feats = HeatmapFeatures.load(folder, threads=1)
    rng = np.random.default_rng(1)
    pos, neg, val_pos, val_neg = [], [], [], []
    for k in range(8):
        blobs = grid_blobs([BLUE] * 16)
        _, fmap = feats.run(field(rng, blobs)[None])
        centres = np.array([(y, x) for y, x, _ in blobs], float)
        bg = rng.uniform(0, 320, (200, 2))
        bg = bg[np.hypot(*(bg[:, None] - centres[None]).transpose(2, 0, 1)).min(1) > 20][:30]
        ring = np.array([(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)][:8], float)
        if k < 5:
            pos.append(sample_features(fmap[0], centres, 4))
            neg.append(sample_features(fmap[0], bg, 4))
        else:
            val_pos += [sample_features(fmap[0], c + ring, 4) for c in centres]
            val_neg.append(sample_features(fmap[0], bg, 4))
    pos, neg = np.concatenate(pos), np.concatenate(neg)
    write_points_replay(folder, feats, train_x=np.r_[pos, neg], train_y=np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                        val_pos_x=np.stack(val_pos), val_neg_x=np.concatenate(val_neg),
                        description="synthetic blue figures")
    return folder


def corrected_export(model: Path, tmp: Path, rng, name: str = "slide") -> tuple[Path, list, list]:
    """An image with blue and red blobs, analysed; blue calls kept, red ones rejected, exported
    by the mitosis task. Returns (CSV, blue centres, red centres)."""
    blobs = grid_blobs([BLUE, RED] * 8)
    image = tmp / f"{name}.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(field(rng, blobs)).save(image)
    result = analyze(image, task="mitosis", model=model, mpp=MPP, out=tmp / f"{name}.zarr", threads=1,
                     tissue="none")  # synthetic blobs on white: glass to the tissue detector
    ann = from_result(result)
    table = ann.table
    assert len(table) == len(blobs)  # the base model calls every blob
    red = np.array([(y, x) for y, x, c in blobs if c == RED], float)
    is_red = np.hypot(*(table[["y", "x"]].to_numpy()[:, None] - red[None]).transpose(2, 0, 1)).min(1) < 4
    table.loc[is_red, "class"] = REJECTED
    table.loc[is_red, "provenance"] = "corrected"
    table["reviewed"] = True
    ann.table = table
    csv = get_task("mitosis").export_corrections(ann, tmp / f"{name}_export")
    blue = [(y, x) for y, x, c in blobs if c == BLUE]
    return csv, blue, [tuple(p) for p in red]


def calls(model: Path, image: np.ndarray, tmp: Path, name: str) -> np.ndarray:
    path = tmp / f"{name}.png"
    Image.fromarray(image).save(path)
    res = analyze(path, task="mitosis", model=model, mpp=MPP, out=tmp / f"{name}.zarr", threads=1,
                     tissue="none")  # synthetic blobs on white: glass to the tissue detector
    return res.table()[["y", "x"]].to_numpy(float)


def found(points: np.ndarray, centres) -> np.ndarray:
    if not len(points):
        return np.zeros(len(centres), bool)
    c = np.asarray(centres, float)
    return np.hypot(*(c[:, None] - points[None]).transpose(2, 0, 1)).min(1) < 4


def test_the_features_output_changes_nothing_else(tmp_path):
    folder = tiny_mitosis_model_dir(tmp_path / "m")
    batch = field(np.random.default_rng(0), grid_blobs([BLUE, RED] * 2, side=128, step=40), side=128)[None]
    before = OnnxPredictor(folder).predict(batch)
    assert add_features_output(folder) and not add_features_output(folder)  # once
    predictor = OnnxPredictor(folder)
    after = predictor.predict(batch)
    assert sorted(after) == ["class_probs", "heatmap"]  # features only on request
    for role in before:
        np.testing.assert_array_equal(before[role], after[role])
    feats = HeatmapFeatures.load(folder)
    heat, fmap = feats.run(batch)
    assert fmap.shape == (1, 6, 32, 32) and np.array_equal(heat, after["heatmap"][:, 0])
    yx = np.argwhere(np.ones((128, 128)))[::37]
    p = np.clip(heat[0][yx[:, 0], yx[:, 1]].astype(np.float64), 1e-6, 1 - 1e-6)
    # the heatmap's logit is the refit layer applied to the sampled features
    np.testing.assert_allclose(feats.logit(sample_features(fmap[0], yx, 4)), np.log(p / (1 - p)), atol=1e-3)


def test_rejected_mimics_are_no_longer_detected_and_figures_stay(model, tmp_path):
    rng = np.random.default_rng(2)
    csv, blue, red = corrected_export(model, tmp_path / "lab", rng)
    steps = []
    result = finetune_mitosis([csv], tmp_path / "tuned", base=model, threads=1,
                              progress=Progress(lambda step, f: steps.append((step, f))))
    # the corrected image, analysed again by the real engine with the new model
    image = np.asarray(Image.open(csv.parent.parent / "slide.png"))
    again = calls(result.folder, image, tmp_path, "again")
    assert found(again, blue).all() and not found(again, red).any()
    # a new image of the same lab: the mimics are gone there too, the figures kept
    unseen = grid_blobs([RED, BLUE] * 8)
    pts = calls(result.folder, field(rng, unseen), tmp_path, "unseen")
    assert found(pts, [(y, x) for y, x, c in unseen if c == BLUE]).all()
    assert not found(pts, [(y, x) for y, x, c in unseen if c == RED]).any()
    before, after = result.metrics["before"], result.metrics["after"]
    assert before["corrections_rejections_held"] == 0.0 and after["corrections_rejections_held"] == 1.0
    assert after["corrections_figures_kept"] == 1.0
    assert after["reference_recall"] >= before["reference_recall"] - 0.01
    assert result.corrections["figures"] == 8 and result.corrections["rejections"] == 8
    card = (result.folder / "MODEL_CARD.md").read_text()
    assert "16 points" in card and str(csv) in card
    tuned = OnnxPredictor(result.folder).spec
    assert tuned.extra["finetune"]["base"]["name"] == "tiny-mitosis"
    assert "features" in tuned.outputs and (result.folder / "replay.npz").is_file()  # tune again
    assert [s for s, _ in steps][0] == "reading the corrections" and steps[-1] == ("done", 1.0)
    assert all(b >= a for (_, a), (_, b) in zip(steps, steps[1:], strict=False))


def test_the_reference_recall_bounds_the_fit(model, tmp_path):
    """Rejecting *figures* (blue) contradicts the replay: the refit may not drop the
    reference recall by more than a point, so blue figures stay detected."""
    rng = np.random.default_rng(3)
    csv, blue, red = corrected_export(model, tmp_path / "wrong", rng)
    import pandas as pd

    table = pd.read_csv(csv)
    table["class"] = REJECTED  # the user rejects everything
    table.to_csv(csv, index=False)
    result = finetune_mitosis([csv], tmp_path / "tuned", base=model, threads=1)
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["reference_recall"] >= before["reference_recall"] - 0.01
    tried = result.metrics["settings_tried"]
    # the weakest anchors do remove every "mimic", at the reference's expense: refused
    assert any(r["reference_recall"] < before["reference_recall"] - 0.01 for r in tried)
    assert result.metrics["chosen"]["reference_recall"] >= before["reference_recall"] - 0.01
    pts = calls(result.folder, field(rng, grid_blobs([BLUE] * 16)), tmp_path, "blue")
    assert found(pts, [(y, x) for y, x, _ in grid_blobs([BLUE] * 16)]).mean() >= 0.95


def test_cancel_writes_nothing(model, tmp_path):
    csv, _, _ = corrected_export(model, tmp_path / "c", np.random.default_rng(4))
    token = CancelToken()

    def cancel_while_fitting(step, fraction):
        if step.startswith("fitting"):
            token.cancel()

    with pytest.raises(FinetuneCancelled):
        finetune_mitosis([csv], tmp_path / "out", base=model, progress=Progress(cancel_while_fitting, token))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder


def test_bad_input_is_a_clear_error(model, tmp_path):
    csv, _, _ = corrected_export(model, tmp_path / "d", np.random.default_rng(5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HematoError, match="no points CSV"):
        finetune_mitosis([tmp_path / "empty"], tmp_path / "o0", base=model)
    import pandas as pd

    unreviewed = tmp_path / "unrev" / "slide_points.csv"
    unreviewed.parent.mkdir()
    t = pd.read_csv(csv)
    t["class"], t["reviewed"], t["provenance"] = "normal", False, "auto"
    t.to_csv(unreviewed, index=False)
    (unreviewed.parent / "slide.png").write_bytes((tmp_path / "d" / "slide.png").read_bytes())
    with pytest.raises(HematoError, match="no corrected points"):
        finetune_mitosis([unreviewed], tmp_path / "o1", base=model)
    lonely = tmp_path / "lonely" / "x_points.csv"
    lonely.parent.mkdir()
    lonely.write_text(csv.read_text())  # no sidecar, no image beside it
    with pytest.raises(HematoError, match="cannot find the image"):
        finetune_mitosis([lonely], tmp_path / "o2", base=model)
    bare = tiny_mitosis_model_dir(tmp_path / "bare")
    with pytest.raises(HematoError, match="no 'features' output"):
        finetune_mitosis([csv], tmp_path / "o3", base=bare)
    add_features_output(bare)
    with pytest.raises(HematoError, match="no replay.npz"):
        finetune_mitosis([csv], tmp_path / "o4", base=bare)
    other = tiny_mitosis_model_dir(tmp_path / "other", seed=7)
    add_features_output(other)
    (other / "replay.npz").write_bytes((model / "replay.npz").read_bytes())
    with pytest.raises(HematoError, match="another model's trunk"):
        finetune_mitosis([csv], tmp_path / "o5", base=other)
    finetune_mitosis([csv], tmp_path / "o6", base=model, threads=1)
    with pytest.raises(HematoError, match="already exists"):
        finetune_mitosis([csv], tmp_path / "o6", base=model)


def test_the_image_is_found_beside_the_csv(model, tmp_path):
    """Without the sidecar: ``<name>_points.csv`` beside ``<name>.png`` (moved to another machine)."""
    csv, _, _ = corrected_export(model, tmp_path / "a", np.random.default_rng(6))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "slide_points.csv").write_text(csv.read_text())
    (moved / "slide.png").write_bytes((tmp_path / "a" / "slide.png").read_bytes())
    result = finetune_mitosis([moved], tmp_path / "m", base=model, threads=1)
    assert result.corrections["images"] == [str(moved / "slide.png")]


def test_the_cli_writes_a_model_analyze_takes(model, tmp_path, capsys):
    from napari_hemato.cli import main

    csv, blue, red = corrected_export(model, tmp_path / "c", np.random.default_rng(7))
    assert main(["finetune", "mitosis", "--data", str(csv.parent), "--out", str(tmp_path / "m"),
                 "--from", str(model), "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "reference recall" in printed.out
    assert "reading the corrections" in printed.err  # progress on stderr
    assert main(["analyze", str(tmp_path / "c" / "slide.png"), "--task", "mitosis", "--model",
                 str(tmp_path / "m"), "--mpp", str(MPP), "--out", str(tmp_path / "run.zarr"),
                 "--tissue", "none"]) == 0
    from napari_hemato.core.engine import open_result

    pts = open_result(tmp_path / "run.zarr").table()[["y", "x"]].to_numpy(float)
    assert found(pts, blue).all() and not found(pts, red).any()


def test_the_bundled_model_exposes_features_and_carries_its_replay():
    from napari_hemato.finetune.points_replay import load_points_replay
    from napari_hemato.models.registry import bundled_models

    folder = bundled_models()["mitosis"]
    feats = HeatmapFeatures.load(folder, threads=1)
    assert feats.head.upsample == 8 and len(feats.weight) == 64
    replay = load_points_replay(folder, feats)  # the probe matches the shipped trunk
    threshold = feats.predictor.spec.postprocess["threshold"]
    offset = np.log(threshold / (1 - threshold))
    pos = replay["val_pos_x"]
    recall = np.mean(feats.logit(pos.reshape(-1, pos.shape[-1])).reshape(pos.shape[:2]).max(1) >= offset)
    assert recall > 0.9  # the shipped head finds the reference figures (the card: 0.97 on mosaics)
    assert (folder / "replay.npz").stat().st_size < 5e6


def test_the_replay_check_tolerates_another_cpus_last_digits(tmp_path):
    """The probe is compared by relative L2 per row (finetune.replay.same_trunk), as the WBC
    replay: 0.5 % off (more than two onnxruntime builds were seen to differ) still loads, a
    shuffled probe does not."""
    from napari_hemato.finetune.points_replay import load_points_replay
    from napari_hemato.models.registry import bundled_models

    folder = bundled_models()["mitosis"]
    feats = HeatmapFeatures.load(folder, threads=1)
    with np.load(folder / "replay.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    copy = tmp_path / "m"
    copy.mkdir()
    np.savez(copy / "replay.npz", **{**arrays, "probe_x": arrays["probe_x"] * 1.005})
    assert len(load_points_replay(copy, feats)["train_x"]) == len(arrays["train_x"])
    np.savez(copy / "replay.npz", **{**arrays, "probe_x": arrays["probe_x"][::-1]})
    with pytest.raises(HematoError, match="another model's trunk"):
        load_points_replay(copy, feats)
