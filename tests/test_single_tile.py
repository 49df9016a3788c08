"""A small image (one tile) is read with only the padding its objects need
(core.single_tile), and off-slide reads keep only the filter's reach of fill
(core.geometry): the results are the general path's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import napari_hemato.core.geometry as geometry
import napari_hemato.core.single_tile as single_tile
from napari_hemato import api
from napari_hemato.core.slide import open_slide
from napari_hemato.samples import sample_path

from .synthetic import disk_image, write_tiff


@pytest.mark.parametrize("mpp", [0.5, 0.3, 1.1, 0.16])
def test_reads_off_the_slide_are_the_unclipped_reads(tmp_path, monkeypatch, mpp):
    """Clipped to the filter's reach and sampled only where a level pixel is felt, a read is
    the read of the whole box, bit for bit."""
    slide = open_slide(write_tiff(tmp_path / "d.tif", disk_image((150, 210), n=20)), mpp=0.5)
    grid = geometry.WorkGrid.for_model(slide, mpp)
    h, w = grid.shape
    boxes = [(-300, -300, h + 340, w + 300), (-40, 5, 60, 90), (h - 8, w - 8, h + 400, w + 260)]
    clipped = [grid.read(slide, b, fill=255) for b in boxes]
    monkeypatch.setattr(geometry, "_clip_span", lambda a, b, n, margin: (a, b))
    monkeypatch.setattr(geometry, "_touching", lambda coords, n, reach: slice(0, len(coords)))
    for box, got in zip(boxes, clipped, strict=True):
        np.testing.assert_array_equal(got, grid.read(slide, box, fill=255))


def _run(path, tmp_path, name, **kw):
    r = api.analyze(path, task="smear", out=tmp_path / f"{name}.zarr", overwrite=True,
                    classifier=False, tissue="none", **kw)
    return r.table(), np.asarray(r.labels())


def _spy(monkeypatch, verdict=None):
    """Record what ``sealed`` says (or make it say ``verdict``)."""
    said, real = [], single_tile.sealed

    def spy(*args, **kwargs):
        said.append(real(*args, **kwargs) if verdict is None else verdict)
        return said[-1]

    monkeypatch.setattr(single_tile, "sealed", spy)
    return said


def test_a_smear_field_in_one_tight_tile_gives_the_full_boxs_objects(tmp_path, monkeypatch):
    field = sample_path("smear_field")
    said = _spy(monkeypatch)
    tight = _run(field, tmp_path, "tight")
    assert said == [True]  # the tight box was read, predicted and kept
    monkeypatch.setattr(single_tile, "tight_margin", lambda spec, mpp: None)
    full = _run(field, tmp_path, "full")
    assert len(tight[0]) > 50 and (tight[0]["class"] == "Platelets").sum() >= 3
    assert tight[0].equals(full[0])
    np.testing.assert_array_equal(tight[1], full[1])


def test_foreground_beyond_the_exact_zone_falls_back_to_the_full_box(tmp_path, monkeypatch):
    field = sample_path("smear_field")
    ref = _run(field, tmp_path, "ref")
    said = _spy(monkeypatch, verdict=False)
    again = _run(field, tmp_path, "again")
    assert said == [False]  # the tight box was refused: the full box was predicted
    assert again[0].equals(ref[0])
    np.testing.assert_array_equal(again[1], ref[1])


def test_sealed_needs_the_foreground_near_the_extent():
    from types import SimpleNamespace

    spec = SimpleNamespace(receptive_field_px=20, postprocess={"threshold": 0.5, "min_distance_um": 1.0})
    margin, shape = 40, (50, 60)  # exact zone: 20 px; less the reach (2 px at 0.5): 18 px
    fg = np.zeros((shape[0] + 2 * margin, shape[1] + 2 * margin), np.float32)
    fg[margin:margin + 10, margin:margin + 10] = 1.0
    assert single_tile.sealed(fg, shape, margin, spec, 0.5)
    fg[margin - 10, margin] = 1.0  # 10 px beyond the extent: still sealed
    assert single_tile.sealed(fg, shape, margin, spec, 0.5)
    fg[margin - 19, margin] = 1.0  # 19 px beyond: the post-processing could see further out
    assert not single_tile.sealed(fg, shape, margin, spec, 0.5)
