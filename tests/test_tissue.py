"""Tissue detection and the engine's skipping of tiles off the tissue, on synthetic slides."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.engine import iter_run, open_result, run
from napari_hemato.core.errors import HematoError, StoreError
from napari_hemato.core.slide import open_slide, slide_from_array
from napari_hemato.core.tissue import TissueMask, detect_tissue, tiles_off_tissue
from napari_hemato.core.tissue_io import TissueError, resolve_tissue
from napari_hemato.models.fake import DarkBlobPredictor

from .synthetic import disk_image

GLASS = (242, 242, 240)


def write_pyramid(path, image, *, mpp, levels=3):
    """A tiled pyramidal TIFF (SubIFDs, 2× per level) with its µm/px."""
    import tifffile

    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(image, subifds=levels - 1, tile=(256, 256), photometric="rgb", **res)
        for k in range(1, levels):
            f = 2**k
            h, w = image.shape[0] // f, image.shape[1] // f
            small = image[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))
            tw.write(small.astype(np.uint8), subfiletype=1, tile=(256, 256), photometric="rgb")
    return path


def he_slide(shape=(2048, 2048), blobs=((700, 600, 380), (1450, 1400, 300)), seed=0):
    """H&E-like blobs (pink with purple nuclei) on noisy glass; returns (image, truth)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(GLASS, 3, (*shape, 3)), 0, 255)
    yy, xx = np.indices(shape)
    truth = np.zeros(shape, bool)
    for cy, cx, r in blobs:
        wobble = 1 + 0.1 * np.sin(np.arctan2(yy - cy, xx - cx) * 5)
        truth |= np.hypot(yy - cy, xx - cx) <= r * wobble
    img[truth] = np.clip(rng.normal((225, 150, 195), 10, (truth.sum(), 3)), 0, 255)
    nuclei = truth & (rng.random(shape) < 0.02)
    img[nuclei] = (110, 60, 150)
    return img.astype(np.uint8), truth


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def he(tmp_path_factory):
    img, truth = he_slide()
    img[200:260, 1500:1900] = (40, 70, 190)  # a blue pen stroke on glass
    img[1800:1840, 200:700] = (40, 150, 80)  # and a green one
    path = write_pyramid(tmp_path_factory.mktemp("he") / "he.tif", img, mpp=0.5)
    return path, truth


def test_mask_matches_the_tissue_and_drops_pen(he):
    path, truth = he
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
    assert mask.mpp == pytest.approx(8.0, rel=0.1)
    sy, sx = mask.scale
    # the truth at the mask's resolution: a mask pixel is tissue where most of it is
    h, w = mask.shape
    t = truth[: int(h * sy), : int(w * sx)].reshape(h, int(sy), w, int(sx)).mean(axis=(1, 3)) > 0.5
    assert iou(mask.mask, t) >= 0.9
    assert not mask.touches((200, 1500, 260, 1900)) and not mask.touches((1800, 200, 1840, 700))
    assert mask.area_mm2 == pytest.approx(truth.sum() * 0.25 / 1e6, rel=0.1)


def test_blank_slide_gives_an_empty_mask(tmp_path):
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(GLASS, 4, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    img[500:503, 500:503] = 90  # a speck of dust
    path = write_pyramid(tmp_path / "blank.tif", img, mpp=0.5)
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
    assert mask.empty and mask.area_mm2 == 0


def test_touching_grows_by_the_margin():
    m = np.zeros((10, 10), bool)
    m[5, 5] = True
    tm = TissueMask(m, (10.0, 10.0), 0.5)
    boxes = np.array([[50, 50, 60, 60], [0, 0, 40, 40], [0, 0, 45, 45], [61, 61, 70, 70]], float)
    assert tm.touching(boxes).tolist() == [True, False, False, False]
    assert tm.touching(boxes, margin=6).tolist() == [True, False, True, True]


@pytest.fixture(scope="module")
def corner(tmp_path_factory):
    """Dark disks (what the fake model finds) on H&E-like tissue in one corner only."""
    img = disk_image((1024, 1024), n=200, seed=5)
    rng = np.random.default_rng(2)
    glass = np.clip(rng.normal(GLASS, 3, img.shape), 0, 255).astype(np.uint8)
    bright = img.min(axis=-1) > 200
    img[bright] = glass[bright]
    tissue = np.zeros(img.shape[:2], bool)
    tissue[:380, :380] = True
    img[tissue & bright] = (225, 150, 195)
    path = write_pyramid(tmp_path_factory.mktemp("corner") / "corner.tif", img, mpp=0.5)
    return path


def counting(predictor):
    seen = []
    original = predictor.predict

    def spy(batch, **kw):
        seen.append(len(batch))
        return original(batch, **kw)

    predictor.predict = spy
    return seen


def test_only_tiles_touching_the_tissue_run_and_match_the_full_run(tmp_path, corner):
    slide = open_slide(corner)
    mask = resolve_tissue(slide, "auto")
    full = run(slide, DarkBlobPredictor(), out=tmp_path / "full.zarr", tile=128)
    predictor = DarkBlobPredictor()
    seen = counting(predictor)
    part = run(slide, predictor, out=tmp_path / "part.zarr", tile=128, tissue=mask)
    skip = tiles_off_tissue(part.plan, part.grid, mask)
    assert part.status == "complete" and 0 < len(skip) < len(part.plan) - 4
    assert sum(seen) == len(part.plan) - len(skip) == len(part.plan) - part.n_off_tissue
    ft, pt = full.table(), part.table()
    owner = part.plan.owners(ft["y"] - 0.5, ft["x"] - 0.5)  # level-0 = work px here (0.5 µm)
    kept = ft[~np.isin(owner, sorted(skip))].reset_index(drop=True)
    assert len(pt) > 20 and len(kept) == len(pt)
    cols = ["id", "y", "x", "area_px", "bbox_y0", "bbox_x1"]
    np.testing.assert_array_equal(pt.sort_values("id")[cols].to_numpy(),
                                  kept.sort_values("id")[cols].to_numpy())
    fl = full.labels()[:]
    fl[~np.isin(fl, kept["id"].to_numpy())] = 0
    np.testing.assert_array_equal(part.labels()[:], fl)
    again = open_result(part.path)
    assert again.tissue.identity() == mask.identity() and again.n_off_tissue == len(skip)


def test_resume_after_cancel_uses_the_mask(tmp_path, corner):
    from napari_hemato.api import iter_analyze

    slide = open_slide(corner)
    mask = resolve_tissue(slide, "auto")
    out = tmp_path / "r.zarr"
    token = CancelToken()
    gen = iter_run(slide, DarkBlobPredictor(), out=out, tile=128, batch_size=2, tissue=mask,
                   cancel=token)
    next(gen)
    token.cancel()
    for _ in gen:
        pass
    assert (out / "tissue.npz").is_file()
    with pytest.raises(StoreError, match="tissue"):  # a different mask: refused
        run(slide, DarkBlobPredictor(), out=out, tile=128, resume=True)
    predictor = DarkBlobPredictor()
    seen = counting(predictor)
    done = len(list((out / "tiles").glob("*.npz")))
    resumed = run(slide, predictor, out=out, tile=128, resume=True,
                  tissue=resolve_tissue(slide, "auto", stored=open_result(out).tissue))
    assert resumed.status == "complete"
    assert sum(seen) == len(resumed.plan) - resumed.n_off_tissue - done
    fresh = run(slide, DarkBlobPredictor(), out=tmp_path / "fresh.zarr", tile=128, tissue=mask)
    np.testing.assert_array_equal(resumed.labels()[:], fresh.labels()[:])
    # the api, resuming with its default ("auto"), takes the stored mask instead of detecting
    gen = iter_analyze(corner, task="nuclei", model=model_api_dir(tmp_path), tile=128,
                       batch_size=2, out=tmp_path / "api.zarr")
    next(gen)
    gen.close()
    stored = open_result(tmp_path / "api.zarr").tissue
    assert stored is not None and stored.source == "auto"
    from napari_hemato.api import analyze

    done = analyze(corner, task="nuclei", model=model_api_dir(tmp_path), tile=128,
                   out=tmp_path / "api.zarr", resume=True)
    assert done.status == "complete" and done.tissue.identity() == stored.identity()


def model_api_dir(tmp_path):
    from .onnx_models import dark_blob_model_dir

    folder = tmp_path / "model"
    return folder if folder.exists() else dark_blob_model_dir(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from .onnx_models import dark_blob_model_dir

    return dark_blob_model_dir(tmp_path_factory.mktemp("model") / "m")


def test_blank_slide_ends_with_no_tissue_found(tmp_path, model_dir, monkeypatch, capsys):
    from napari_hemato.cli import main
    from napari_hemato.models.onnx_backend import OnnxPredictor

    rng = np.random.default_rng(3)
    img = np.clip(rng.normal(GLASS, 4, (2048, 2048, 3)), 0, 255).astype(np.uint8)
    path = write_pyramid(tmp_path / "blank.tif", img, mpp=0.5)
    calls = []
    original = OnnxPredictor.predict
    monkeypatch.setattr(OnnxPredictor, "predict",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    code = main(["analyze", str(path), "--task", "nuclei", "--model", str(model_dir),
                 "--out", str(tmp_path / "r.zarr"), "--json"])
    assert code == 0 and calls == []
    import json

    s = json.loads(capsys.readouterr().out)
    assert s["n_objects"] == 0 and s["tiles_off_tissue"] == s["tiles"] > 1
    assert any("no tissue found" in w for w in s["warnings"]) and s["tissue_area_mm2"] == 0
    code = main(["analyze", str(path), "--task", "nuclei", "--model", str(model_dir), "--tissue",
                 "none", "--out", str(tmp_path / "n.zarr"), "--json"])
    assert code == 0 and len(calls) >= 1
    s = json.loads(capsys.readouterr().out)
    assert s["tiles_off_tissue"] == 0 and s["tissue"] is None and s["warnings"] == []


def test_mask_file_is_honoured_and_bad_ones_are_one_line_errors(tmp_path, corner, model_dir,
                                                                capsys):
    from PIL import Image

    from napari_hemato.api import analyze
    from napari_hemato.cli import main

    m = np.zeros((64, 64), np.uint8)
    m[40:, 40:] = 255  # bottom-right quarter of the slide
    Image.fromarray(m).save(tmp_path / "mask.png")
    result = analyze(corner, task="nuclei", model=model_dir, out=tmp_path / "a.zarr",
                     tissue=tmp_path / "mask.png", tile=128)
    ys, xs = result.table()["y"], result.table()["x"]
    assert len(ys) > 0 and (ys >= 512).all() and (xs >= 512).all()  # tiles near 640+
    assert result.tissue.source.startswith("file:")
    arr = analyze(corner, task="nuclei", model=model_dir, out=tmp_path / "b.zarr",
                  tissue=m > 0, tile=128)
    assert arr.tissue.identity() == result.tissue.identity()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((10, 64), np.uint8)).save(tmp_path / "wide.png")
    for bad, words in (("bad.png", "cannot read"), ("wide.png", "aspect"), ("nope.png", "no such")):
        code = main(["analyze", str(corner), "--task", "nuclei", "--model", str(model_dir),
                     "--tissue", str(tmp_path / bad), "--out", str(tmp_path / f"{bad}.zarr")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and "\n" not in err
    with pytest.raises(TissueError):
        resolve_tissue(open_slide(corner), 3.0)
    assert issubclass(TissueError, HematoError)


def test_geojson_mask(tmp_path, corner):
    import json

    poly = {"type": "Polygon", "coordinates": [[[0, 0], [400, 0], [400, 300], [0, 300], [0, 0]]]}
    (tmp_path / "m.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": poly,
                                                    "properties": {}}]}))
    mask = resolve_tissue(open_slide(corner), tmp_path / "m.geojson")
    assert mask.touches((0, 0, 10, 10)) and not mask.touches((320, 420, 1000, 1000))
    assert mask.area_mm2 == pytest.approx(400 * 300 * 0.25 / 1e6, rel=0.05)


def test_task_defaults():
    from napari_hemato.tasks import get_task

    assert all(get_task(n).tissue_default == "auto" for n in ("nuclei", "mitosis", "smear"))
    # "auto" is each task's own: H&E tissue for sections, the reading zone for a smear scan
    # (nothing left out of a camera field)
    field = slide_from_array(np.full((480, 640, 3), 230, np.uint8), mpp=0.1)
    assert get_task("smear").find_tissue(field) is None
    assert get_task("nuclei").find_tissue(field).empty


def test_a_small_tile_all_of_tissue_is_tissue(tmp_path):
    """A crop smaller than a dust speck (here 64 × 64 µm, all tissue) is not dust: parts
    touching the image's edge are kept (a mitosis crop once ended in "no tissue found")."""
    from .synthetic import write_tiff

    img, truth = he_slide(shape=(256, 256), blobs=((128, 128, 400),), seed=2)
    assert truth.all()
    with open_slide(write_tiff(tmp_path / "tile.tif", img, mpp=0.25)) as slide:
        mask = detect_tissue(slide)
    assert mask.mask.mean() > 0.9
    # and a speck inside a larger image is still dust
    big, _ = he_slide(shape=(1024, 1024), blobs=((512, 512, 20),), seed=3)
    with open_slide(write_pyramid(tmp_path / "speck.tif", big, mpp=0.5)) as slide:
        assert detect_tissue(slide).empty
