"""Engine invariants with models whose output we can predict.

- reading tiles of the work grid reassembles the whole grid (identity);
- tiled output equals untiled output (same partition of pixels into objects);
- every object is owned by exactly one tile, ids are unique;
- cancel + resume redoes no finished tile and gives the same result.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.engine import iter_run, run
from napari_hemato.core.errors import StoreError
from napari_hemato.core.geometry import WorkGrid
from napari_hemato.core.slide import open_slide
from napari_hemato.core.tiling import plan_tiles
from napari_hemato.models.fake import DarkBlobPredictor, fake_spec

from .synthetic import disk_image, write_tiff


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images differ only by a renaming of ids."""
    if a.shape != b.shape or ((a == 0) != (b == 0)).any():
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    pairs = pairs[:, pairs[0] > 0]
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.fixture(scope="module")
def disk_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "disks.tif"
    write_tiff(path, disk_image((600, 800), n=150), mpp=0.5)
    return open_slide(path)


@pytest.mark.parametrize("mpp", [0.5, 0.3])
def test_tiles_reassemble_the_work_grid(tmp_path, mpp):
    path = write_tiff(tmp_path / "x.tif", disk_image((300, 420), n=40, seed=3))
    slide = open_slide(path, mpp=mpp)
    grid = WorkGrid.for_model(slide, 0.5, roi=(10, 20, 290, 400))
    whole = grid.read(slide, (0, 0, *grid.shape))
    plan = plan_tiles(grid.shape, tile=64, halo=16)
    rebuilt = np.zeros_like(whole)
    for t in plan:
        y0, x0, y1, x1 = t.core
        tile = grid.read(slide, t.outer)
        oy, ox = y0 - t.outer[0], x0 - t.outer[1]
        rebuilt[y0:y1, x0:x1] = tile[oy : oy + y1 - y0, ox : ox + x1 - x0]
    np.testing.assert_array_equal(rebuilt, whole)
    if mpp == 0.5:  # no resampling: the work grid is the slide itself
        np.testing.assert_array_equal(whole, slide.read_region(0, 10, 20, 290, 400)[..., :3])


@pytest.mark.parametrize("mpp", [0.5, 0.25])
@pytest.mark.parametrize("tile", [96, 200])
def test_tiled_equals_untiled(tmp_path, disk_slide, mpp, tile):
    slide = open_slide(disk_slide.path, mpp=mpp)
    predictor = DarkBlobPredictor()
    tiled = run(slide, predictor, out=tmp_path / "tiled.zarr", tile=tile, batch_size=3)
    whole = run(slide, predictor, out=tmp_path / "whole.zarr", tile=4096)
    assert len(tiled.plan) >= 4 and len(whole.plan) == 1
    a, b = tiled.labels()[:], whole.labels()[:]
    assert a.max() > 0
    assert same_partition(a, b)
    ta, tb = tiled.table(), whole.table()
    assert len(ta) == len(tb) == len(np.unique(a)) - 1
    assert ta["id"].is_unique
    np.testing.assert_allclose(np.sort(ta["y"]), np.sort(tb["y"]), atol=1e-9)
    np.testing.assert_allclose(np.sort(ta["area_px"]), np.sort(tb["area_px"]), rtol=1e-9)


def test_objects_are_whole_and_owned_once(tmp_path, disk_slide):
    result = run(disk_slide, DarkBlobPredictor(), out=tmp_path / "r.zarr", tile=96)
    labels = result.labels()[:]
    table = result.table()
    assert set(np.unique(labels)[1:]) == set(table["id"])
    # 150 disks were drawn; each is found exactly once (none cut, none doubled)
    assert len(table) == 150
    from scipy import ndimage as ndi

    n_components = [ndi.label(labels == i)[1] for i in table["id"].to_numpy()[:40]]
    assert set(n_components) == {1}
    row = table.iloc[0]
    assert row["bbox_y0"] <= row["y"] < row["bbox_y1"] and row["bbox_x0"] <= row["x"] < row["bbox_x1"]
    assert row["provenance"] == "auto" and not row["reviewed"]
    assert row["model"] == "fake-dark-blobs"


def test_table_coordinates_are_level0_pixels(tmp_path):
    img = np.full((400, 400, 3), 240, np.uint8)
    img[100:120, 300:320] = 40  # one 20x20 px square, centre (109.5, 309.5)
    path = write_tiff(tmp_path / "sq.tif", img)
    slide = open_slide(path, mpp=0.25)  # model at 0.5 µm/px: work grid is half size
    result = run(slide, DarkBlobPredictor(), out=tmp_path / "r.zarr", roi=(50, 200, 400, 400))
    table = result.table()
    assert len(table) == 1
    assert table["y"][0] == pytest.approx(109.5, abs=0.6)
    assert table["x"][0] == pytest.approx(309.5, abs=0.6)
    assert table["y_um"][0] == pytest.approx(109.5 * 0.25, abs=0.2)
    assert table["area_um2"][0] == pytest.approx(400 * 0.25**2, rel=0.25)
    scale, translate = result.grid.napari_placement()
    assert scale == (0.5, 0.5)
    assert translate[0] == pytest.approx((50 + 0.5) * 0.25)


def test_cancel_and_resume_redo_no_finished_tile(tmp_path, disk_slide):
    out = tmp_path / "r.zarr"
    predictor = DarkBlobPredictor()
    gen = iter_run(disk_slide, predictor, out=out, tile=96, batch_size=2)
    events = [next(gen), next(gen)]
    gen.close()  # what a widget's Cancel or a closed CLI does
    assert events[-1].done == 4 and events[-1].total == 63
    done = {int(p.stem) for p in (out / "tiles").glob("*.npz")}
    assert 4 <= len(done) <= 6  # the batch in flight when closed is finished, not lost

    seen = []
    original = predictor.predict

    def spy(batch, **kw):
        seen.append(len(batch))
        return original(batch, **kw)

    predictor.predict = spy
    resumed = run(disk_slide, predictor, out=out, tile=96, batch_size=2, resume=True)
    assert resumed.status == "complete"
    assert sum(seen) == 63 - len(done)  # every pending tile once, no finished tile again
    fresh = run(disk_slide, DarkBlobPredictor(), out=tmp_path / "fresh.zarr", tile=96)
    np.testing.assert_array_equal(resumed.labels()[:], fresh.labels()[:])


def test_cancel_token_stops_and_keeps_finished_tiles(tmp_path, disk_slide):
    token = CancelToken()
    gen = iter_run(disk_slide, DarkBlobPredictor(), out=tmp_path / "r.zarr", tile=96, cancel=token,
                   batch_size=2)
    next(gen)
    token.cancel()
    extra = 0
    while True:
        try:
            next(gen)
            extra += 1
        except StopIteration as stop:
            result = stop.value
            break
    assert extra <= 1  # at most the batch already in flight
    assert result.status == "cancelled"
    assert 0 < result.n_done < len(result.plan)
    assert result.store.status == "cancelled"


def test_store_refuses_to_clobber_or_mix_runs(tmp_path, disk_slide):
    out = tmp_path / "r.zarr"
    run(disk_slide, DarkBlobPredictor(), out=out, tile=96)
    with pytest.raises(StoreError, match="already exists"):
        run(disk_slide, DarkBlobPredictor(), out=out, tile=96)
    with pytest.raises(StoreError, match="differs in plan"):
        run(disk_slide, DarkBlobPredictor(), out=out, tile=128, resume=True)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a napari-hemato result"):
        run(disk_slide, DarkBlobPredictor(), out=other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    again = run(disk_slide, DarkBlobPredictor(), out=out, tile=128, overwrite=True)
    assert again.status == "complete"


def test_points_tiled_equals_untiled_and_nms(tmp_path, disk_slide):
    spec = fake_spec(kind="points", task="mitosis", outputs={"heatmap": "heat"},
                     postprocess={"threshold": 0.5, "min_distance_um": 3.0})
    predictor = DarkBlobPredictor(spec)
    tiled = run(disk_slide, predictor, out=tmp_path / "t.zarr", tile=96)
    whole = run(disk_slide, predictor, out=tmp_path / "w.zarr", tile=4096)
    assert tiled.labels() is None
    ta, tb = tiled.table(), whole.table()
    assert len(ta) == len(tb) > 100
    np.testing.assert_allclose(np.sort(ta["y"]), np.sort(tb["y"]))
    assert ta["score"].between(0.5, 1).all()


def test_distributed_scheduler_gives_identical_output(tmp_path, disk_slide):
    distributed = pytest.importorskip("distributed")
    local = run(disk_slide, DarkBlobPredictor(), out=tmp_path / "local.zarr", tile=128)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = run(disk_slide, DarkBlobPredictor(), out=tmp_path / "remote.zarr", tile=128,
                     scheduler=client)
    np.testing.assert_array_equal(local.labels()[:], remote.labels()[:])
    assert local.table().equals(remote.table())


def test_whole_classes_are_not_split_and_tiling_keeps_them_whole(tmp_path):
    """``postprocess.whole_classes``: touching cells of that class stay one object (a lobed
    white cell); other classes are split by the watershed; tiled output equals untiled."""
    img = np.full((160, 260, 3), 245, np.uint8)
    yy, xx = np.mgrid[:160, :260]
    for cx, colour in ((40, (150, 20, 20)), (62, (150, 20, 20)), (160, (20, 20, 150)), (182, (20, 20, 150))):
        img[(yy - 80) ** 2 + (xx - cx) ** 2 < 13**2] = colour  # two touching pairs of discs
    path = write_tiff(tmp_path / "pairs.tif", img, mpp=0.5)
    spec = fake_spec(class_names=("red", "blue"), outputs={"foreground": "fg", "class_probs": "p"}, max_object_um=40.0,
                     postprocess={"threshold": 0.5, "min_distance_um": 3.0, "min_area_um2": 4.0,
                                  "whole_classes": ["blue"], "whole_min_area_um2": 10.0})
    slide = open_slide(path)
    tiled = run(slide, DarkBlobPredictor(spec), out=tmp_path / "t.zarr", tile=84)
    whole = run(slide, DarkBlobPredictor(spec), out=tmp_path / "w.zarr", tile=4096)
    table = whole.table().sort_values("x")
    assert table["class"].tolist() == ["red", "red", "blue"]
    assert same_partition(tiled.labels()[:], whole.labels()[:]) and len(tiled.plan) >= 4
    split = run(slide, DarkBlobPredictor(fake_spec(**{**spec.__dict__, "postprocess": {
        k: v for k, v in spec.postprocess.items() if k != "whole_classes"}})), out=tmp_path / "s.zarr")
    assert len(split.table()) == 4  # without whole_classes the blue pair is cut in two


def test_h_maxima_seeds_tiled_equals_untiled(tmp_path, disk_slide):
    """``postprocess.seed_h`` (dynamics of the distance map) is local: tiling changes nothing."""
    spec = fake_spec(postprocess={"threshold": 0.5, "seed_h": 1.0, "min_area_um2": 4.0})
    tiled = run(disk_slide, DarkBlobPredictor(spec), out=tmp_path / "t.zarr", tile=96)
    whole = run(disk_slide, DarkBlobPredictor(spec), out=tmp_path / "w.zarr", tile=4096)
    a, b = tiled.labels()[:], whole.labels()[:]
    assert len(tiled.plan) >= 4 and a.max() > 100
    assert same_partition(a, b)


def test_unknown_pixel_size_uses_the_specs_assumed_input_mpp(tmp_path):
    """A file without µm/px is read as if at ``assumed_input_mpp``: same result as stating it."""
    path = write_tiff(tmp_path / "nompp.tif", disk_image((300, 400), n=40, seed=5))
    spec = fake_spec(assumed_input_mpp=0.25)
    bare = run(open_slide(path), DarkBlobPredictor(spec), out=tmp_path / "a.zarr")
    told = run(open_slide(path, mpp=0.25), DarkBlobPredictor(spec), out=tmp_path / "b.zarr")
    assert bare.grid.mpp_assumed and not told.grid.mpp_assumed
    assert bare.grid.factor == told.grid.factor == 2.0
    assert same_partition(bare.labels()[:], told.labels()[:]) and bare.labels()[:].max() > 10
    with pytest.raises(Exception, match="assumed_input_mpp"):
        fake_spec(assumed_input_mpp=-1.0)
