"""Fine-tuning the nucleus segmenter from corrected masks, torch-free, with the bundled model
on a crop of the bundled CMU sample (the measurement on held-out data:
benchmarks/bench_finetune_nuclei.py).

The synthetic lab draws every nucleus 1 µm wider than the model does (its masks include the
rim): a convention the refit of the last layer can learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import expand_labels

from napari_hemato.api import analyze
from napari_hemato.core.annotations import from_result
from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import HematoError, ModelError
from napari_hemato.finetune import finetune, onnx_edit
from napari_hemato.finetune import nuclei as fn
from napari_hemato.finetune import segmenter_regions as sr
from napari_hemato.finetune.common import FinetuneCancelled, Progress
from napari_hemato.finetune.pixels_replay import load_pixels_replay
from napari_hemato.finetune.segmenter_features import SegmenterFeatures
from napari_hemato.models.registry import bundled_models
from napari_hemato.tasks import get_task

pytest.importorskip("onnx")
MPP = 0.5
WIDER_UM = 1.0


@pytest.fixture(scope="module")
def base() -> Path:
    return bundled_models()["nuclei"]


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    """A 384² H&E crop of the bundled CMU sample, saved as PNG."""
    from napari_hemato.core.slide import open_slide, to_rgb8
    from napari_hemato.samples import sample_path

    with open_slide(sample_path("he_slide")) as slide:
        image = to_rgb8(slide.read_region(0, 1100, 900, 1484, 1284))
    path = tmp_path_factory.mktemp("crop") / "cmu_crop.png"
    Image.fromarray(image).save(path)
    return path


def analysed(path: Path, model, out: Path):
    return analyze(path, task="nuclei", model=model, mpp=MPP, out=out, threads=1, tissue="none")


@pytest.fixture(scope="module")
def corrected(crop, base, tmp_path_factory) -> tuple[Path, float]:
    """The crop analysed by the bundled model, every nucleus drawn 1 µm wider, exported as the
    Review dock's fine-tune exports it. Returns (export folder, the model's mean nucleus area)."""
    tmp = tmp_path_factory.mktemp("corrected")
    ann = from_result(analysed(crop, base, tmp / "run.zarr"))
    area = float(np.mean(np.bincount(ann.labels.ravel())[1:][np.bincount(ann.labels.ravel())[1:] > 0]))
    ann.labels = expand_labels(np.asarray(ann.labels), WIDER_UM / MPP).astype(np.uint32)
    get_task("nuclei").export_corrections(ann, tmp / "exports")
    return tmp / "exports", area


def mean_area(labels: np.ndarray) -> float:
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    return float(counts[counts > 0].mean())


def test_the_bundled_model_exposes_features_and_carries_its_replay(base):
    feats = SegmenterFeatures.load(base, threads=1)
    assert feats.dim == 8 and feats.heads["foreground"].channel == 0 and feats.heads["distance"].channel == 1
    replay = load_pixels_replay(base, feats.run)  # the probe matches the shipped trunk
    scores = fn.reference_scores(feats.init, fn.reference_regions(replay), feats.spec)
    assert scores["reference_f1"] > 0.75  # the shipped head on its own validation crops
    assert (base / "replay.npz").stat().st_size < 5e6


def test_the_head_is_found_when_the_maps_are_sliced_after_the_sigmoid(base):
    model = onnx_edit.load(base / "model.onnx")
    fg, dist = (onnx_edit.find_heatmap_head(model, r) for r in ("foreground", "distance"))
    assert (fg.channel, dist.channel) == (0, 1) and fg.weight == dist.weight and fg.upsample == 1


def test_features_in_tiles_equal_one_run(base, monkeypatch):
    feats = SegmenterFeatures.load(base, threads=1)
    rng = np.random.default_rng(0)
    image = rng.integers(60, 250, (300, 270, 3)).astype(np.uint8)
    whole = feats.run(image)
    monkeypatch.setattr("napari_hemato.finetune.segmenter_features.TILE", 128)
    tiled = feats.run(image)
    assert tiled.shape == whole.shape == (8, 300, 270)
    np.testing.assert_allclose(tiled, whole, atol=1e-4 * float(np.abs(whole).max()))


def test_the_shipped_head_reproduces_the_models_maps(base):
    feats = SegmenterFeatures.load(base, threads=1)
    image = np.random.default_rng(1).integers(60, 250, (64, 96, 3)).astype(np.uint8)
    out = feats.predictor.predict(image[None], roles=["foreground", "distance"])
    fg, dist = SegmenterFeatures.maps(feats.run(image), feats.init)
    np.testing.assert_allclose(fg, out["foreground"][0, 0], atol=1e-5)
    np.testing.assert_allclose(dist, out["distance"][0, 0], atol=1e-5)


def test_every_region_is_held_out_once_or_the_last_fifth():
    def region(n, shape=(50, 100)):
        lab = np.zeros(shape, np.int32)
        for i in range(n):
            lab[2 + 4 * (i // 20) : 4 + 4 * (i // 20), 2 + 4 * (i % 20) : 4 + 4 * (i % 20)] = i + 1
        return sr.Region("r", lab, np.zeros((2, *shape), np.float32), None)

    many = [region(12) for _ in range(7)]
    plan, how = sr.folds(many)
    assert len(plan) == sr.MAX_FOLDS and how.startswith("5 folds")
    held = [id(r) for _, h in plan for r in h]
    assert sorted(held) == sorted(id(r) for r in many)  # each region held out exactly once
    assert all(not {id(r) for r in f} & {id(r) for r in h} for f, h in plan)
    [(fit, held)], how = sr.folds([region(12)])
    assert fit[0].labels.shape == (50, 80) and held[0].labels.shape == (50, 20) and "columns" in how
    [(fit, held)], how = sr.folds([region(3)])
    assert fit == held and how.startswith("none")


def test_the_refit_learns_the_labs_wider_masks_and_keeps_the_reference(base, crop, corrected, tmp_path):
    exports, area_before = corrected
    steps = []
    result = finetune("nuclei", [exports], tmp_path / "m", base=base, threads=1,
                      progress=Progress(lambda s, f: steps.append((s, f))))
    before, after = result.metrics["before"], result.metrics["after"]
    assert "note" not in after, after
    assert after["heldout_score_of_the_split_fit"] > before["heldout_score"]
    assert after["reference_f1"] >= before["reference_f1"] - fn.MAX_REFERENCE_DROP
    assert after["reference_aji"] >= before["reference_aji"] - fn.MAX_REFERENCE_DROP
    assert result.corrections["regions"] == 1 and result.corrections["nuclei"] > 50
    assert steps[0] == ("reading the corrections", 0.0) and steps[-1] == ("done", 1.0)
    folder = result.folder
    spec = (folder / "model.json").read_text()
    assert '"hemato-nuclei-he-finetuned"' in spec
    # the int8 network keeps its last convolution float: the refit is written there too
    from napari_hemato.models.onnx_backend import OnnxPredictor

    image = np.asarray(Image.open(crop))[None, :128, :128]
    int8 = OnnxPredictor(folder, threads=1, precision="int8").predict(image)["foreground"]
    base_int8 = OnnxPredictor(base, threads=1, precision="int8").predict(image)["foreground"]
    flt = OnnxPredictor(folder, threads=1, precision="float").predict(image)["foreground"]
    assert (folder / "model_int8.onnx").is_file() and not np.allclose(int8, base_int8, atol=1e-3)
    assert np.abs(int8 - flt).mean() < 0.02  # the same refit, on dequantized features
    card = (folder / "MODEL_CARD.md").read_text()
    assert (folder / "replay.npz").is_file() and "nuclei in 1 exported region" in card
    assert "weakest reference crop" in card and 0 <= after["reference_worst_crop_f1"] <= after["reference_f1"]
    # the new model draws wider nuclei where the base drew them
    labels = from_result(analysed(crop, folder, tmp_path / "run.zarr")).labels
    assert mean_area(labels) > 1.1 * area_before


def test_cancel_writes_nothing(base, corrected, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(FinetuneCancelled):
        finetune("nuclei", [corrected[0]], tmp_path / "m", base=base, threads=1, progress=Progress(None, token))
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_bad_input_is_a_clear_error(base, crop, corrected, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HematoError, match="no exported masks"):
        finetune("nuclei", [empty], tmp_path / "m", base=base, threads=1)
    ann = from_result(analysed(crop, base, tmp_path / "run.zarr"))
    ann.mpp = None  # an image whose pixel size nobody typed
    get_task("nuclei").export_corrections(ann, tmp_path / "no_mpp")
    with pytest.raises(HematoError, match="no pixel size"):
        finetune("nuclei", [tmp_path / "no_mpp"], tmp_path / "m", base=base, threads=1)
    ann.labels = None  # a whole-slide layer: its masks stay in the store
    with pytest.raises(HematoError, match="Edit here"):
        get_task("nuclei").export_corrections(ann, tmp_path / "lazy")
    with pytest.raises(HematoError, match="already exists"):
        finetune("nuclei", [corrected[0]], empty, base=base, threads=1)
    assert not (tmp_path / "m").exists()


def test_the_cli_writes_a_model_analyze_takes(base, crop, corrected, tmp_path, capsys):
    from napari_hemato.cli import main

    assert main(["finetune", "nuclei", "--data", str(corrected[0]), "--out", str(tmp_path / "m"),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert "nuclei in 1 corrected region(s)" in printed.out and "reference f1" in printed.out
    assert "analyze SLIDE --task nuclei --model" in printed.out
    assert main(["analyze", str(crop), "--task", "nuclei", "--model", str(tmp_path / "m"), "--mpp", str(MPP),
                 "--out", str(tmp_path / "run.zarr"), "--tissue", "none"]) == 0


def test_the_int8_network_runs_without_the_features_output(base):
    from napari_hemato.models.onnx_backend import OnnxPredictor

    predictor = OnnxPredictor(base, threads=1, precision="int8")
    image = np.full((1, 64, 64, 3), 200, np.uint8)
    assert set(predictor.predict(image)) == {"foreground", "distance"}
    with pytest.raises(ModelError, match="int8 network"):
        predictor.predict(image, roles=["features"])


def test_the_replay_is_rebuilt_from_the_reference_data(base, shared_data, tmp_path):
    """``train.nuclei_replay`` (no torch) on a copy of the bundled folder: the features output is
    there already, the replay's probe matches the trunk and its crops are the validation images'."""
    import shutil

    from napari_hemato.train.nuclei_replay import VAL_CROP, build_replay

    folder = tmp_path / "nuclei"
    shutil.copytree(base, folder)
    (folder / "replay.npz").unlink()
    build_replay(folder, shared_data, per_image=20, threads=1)
    feats = SegmenterFeatures.load(folder, threads=1)
    replay = load_pixels_replay(folder, feats.run)
    crops = fn.reference_regions(replay)
    assert len(crops) == len(feats.spec.extra["validation_images"])
    assert all(c.labels.shape[0] <= VAL_CROP and c.features.shape[0] == 8 for c in crops)
    assert replay["train_x"].shape == (20 * feats.spec.extra["train_images"], 8)
    with np.load(base / "replay.npz") as shipped:  # the same crops as the shipped replay's
        np.testing.assert_array_equal(replay["val_labels"], shipped["val_labels"])


def test_an_edit_here_window_is_a_region_to_fine_tune_on(base, crop, tmp_path):
    """On a whole slide the reviewed region is an "Edit here" window: level-0 masks with their
    origin, exported and read back over the same pixels of the slide."""
    from napari_hemato.core.region_edit import open_window

    result = analysed(crop, base, tmp_path / "run.zarr")
    window = open_window(result, result.table(), (64, 64, 320, 320))
    y0, x0 = window.origin
    window.labels = expand_labels(np.asarray(window.labels), WIDER_UM / MPP).astype(np.uint32)
    tif = get_task("nuclei").export_corrections(window, tmp_path / "exports")
    from napari_hemato.core.export.regions import load_instance_export

    region = load_instance_export(tif)
    h, w = window.labels.shape
    np.testing.assert_array_equal(region.image, np.asarray(Image.open(crop))[y0:y0 + h, x0:x0 + w])
    assert (region.labels > 0).sum() == (window.labels > 0).sum()
    out = finetune("nuclei", [tmp_path / "exports"], tmp_path / "m", base=base, threads=1)
    assert out.corrections["regions"] == 1 and out.corrections["nuclei"] >= 10
