"""A result's lower-resolution labels: every second pixel of the level above, built when a
run completes, kept current by saved mask edits, and opened by napari as a multiscale layer."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_hemato.core import label_pyramid
from napari_hemato.core.engine import open_result, run
from napari_hemato.core.region_edit import commit_window, open_window
from napari_hemato.core.review import ReviewSession
from napari_hemato.core.slide import open_slide
from napari_hemato.models.fake import DarkBlobPredictor, fake_spec

from .synthetic import disk_image, write_tiff


@pytest.fixture
def small_top(monkeypatch):
    """A pyramid down to 40 px and blocks of 16 px, so small test images get several levels
    and levels are written in several blocks."""
    monkeypatch.setattr(label_pyramid, "TOP_SIDE", 40)
    monkeypatch.setattr(label_pyramid, "BLOCK", 16)


def assert_levels_are_strided(group) -> None:
    levels = label_pyramid.levels(group)
    base = np.asarray(levels[0][:])
    assert [a.shape for a in levels] == label_pyramid.level_shapes(base.shape)
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(np.asarray(level[:]), base[:: 2**k, :: 2**k])


def test_levels_keep_every_second_pixel_and_are_listed_in_the_metadata(small_top, tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    labels = group.create_group("labels")
    base = labels.create_array("0", shape=(150, 97), chunks=(32, 32), dtype="uint32")
    base[:] = np.random.default_rng(0).integers(0, 50, (150, 97), dtype=np.uint32)
    labels.attrs["multiscales"] = [{"datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [0.5, 0.5]}, {"type": "translation", "translation": [1.0, 2.0]}]}]}]
    assert label_pyramid.levels(group)[0].shape == (150, 97)  # none built: level 0 only
    assert label_pyramid.build(group) == 3  # 150 -> 75 -> 38
    assert_levels_are_strided(group)
    datasets = group["labels"].attrs["multiscales"][0]["datasets"]  # a fresh handle
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert datasets[2]["coordinateTransformations"][0]["scale"] == [2.0, 2.0]
    assert not label_pyramid.ensure(group)  # complete: nothing to do


def test_a_run_builds_them_and_a_saved_edit_updates_them(small_top, tmp_path):
    slide = open_slide(write_tiff(tmp_path / "s.tif", disk_image((300, 400), n=60, seed=3)),
                       mpp=0.5)
    result = run(slide, DarkBlobPredictor(fake_spec(tile=64, max_object_um=12.0)),
                 out=tmp_path / "r.zarr")
    assert len(result.label_levels()) == 5  # 300x400 -> 150x200 -> 75x100 -> 38x50 -> 19x25
    assert_levels_are_strided(result.store.group)
    table = result.table()
    ann = open_window(result, table, (100, 100, 170, 220))
    session = ReviewSession(ann)
    inside = [i for i in ann.table["id"] if i not in ann.metadata["edit"]["locked"]]
    session.delete(inside[:2])
    commit_window(result, session.to_annotations(), table)
    reopened = open_result(result.path)
    assert_levels_are_strided(reopened.store.group)  # the edit reached every level


def test_a_store_without_levels_gets_them_when_opened_for_the_viewer(small_top, tmp_path):
    from napari_hemato.io.viewer import MAX_EDITABLE_PIXELS, result_layer_data

    slide = open_slide(write_tiff(tmp_path / "s.tif", disk_image((300, 400), n=60, seed=3)),
                       mpp=0.5)
    result = run(slide, DarkBlobPredictor(fake_spec(tile=64, max_object_um=12.0)),
                 out=tmp_path / "r.zarr")
    labels = result.store.group["labels"]
    for k in ("1", "2", "3", "4"):
        del labels[k]
    labels.attrs[label_pyramid._ATTR] = 1  # as a store written before the levels existed
    assert len(label_pyramid.levels(result.store.group)) == 1
    import napari_hemato.io.viewer as viewer_mod

    try:
        viewer_mod.MAX_EDITABLE_PIXELS = 1000  # make this small result "whole-slide"
        [(data, kwargs, kind)] = result_layer_data(open_result(result.path), name="n")
    finally:
        viewer_mod.MAX_EDITABLE_PIXELS = MAX_EDITABLE_PIXELS
    assert kind == "labels" and kwargs["multiscale"] and len(data) == 5
    assert_levels_are_strided(result.store.group)
