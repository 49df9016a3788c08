"""The table's boxes and areas are those of the label image the user gets.

For every row: the level-0 box lies inside the image and ROI and is the box of
that id's pixels in the exported level-0 label TIFF, and ``area_px`` is their
count; also when objects are cut by the image or ROI edge (where the network
predicts foreground in the padding) and when the work grid is resampled.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.engine import run
from napari_hemato.core.export.tiff import export_result_tiff
from napari_hemato.core.geometry import WorkGrid, work_index
from napari_hemato.core.slide import open_slide
from napari_hemato.models.fake import DarkBlobPredictor, fake_spec

from .synthetic import write_tiff


def exported_labels(result, path) -> np.ndarray:
    from tifffile import TiffFile

    with TiffFile(export_result_tiff(result, path)) as tif:
        return tif.pages[0].asarray()


def assert_table_is_the_label_image(table: pd.DataFrame, labels: np.ndarray, roi) -> None:
    """Every row's box and area are those of its id's pixels in ``labels`` (level 0, at ``roi``)."""
    ys, xs = np.nonzero(labels)
    pixels = pd.DataFrame({"id": labels[ys, xs].astype(np.int64), "y": ys + roi[0], "x": xs + roi[1]})
    truth = pixels.groupby("id").agg(y0=("y", "min"), x0=("x", "min"), y1=("y", "max"),
                                     x1=("x", "max"), n=("y", "size"))
    rows = table.set_index("id")
    assert set(rows.index) == set(truth.index)
    truth = truth.loc[rows.index]
    assert (rows["bbox_y0"] >= roi[0]).all() and (rows["bbox_x0"] >= roi[1]).all()
    assert (rows["bbox_y1"] <= roi[2]).all() and (rows["bbox_x1"] <= roi[3]).all()
    bad = rows.index[rows["area_px"].to_numpy() != truth["n"].to_numpy()]
    assert not len(bad), rows.loc[bad[:5], ["bbox_y0", "bbox_x0", "area_px"]].join(truth["n"])
    np.testing.assert_array_equal(rows["bbox_y0"], truth["y0"])
    np.testing.assert_array_equal(rows["bbox_x0"], truth["x0"])
    np.testing.assert_array_equal(rows["bbox_y1"], truth["y1"] + 1)
    np.testing.assert_array_equal(rows["bbox_x1"], truth["x1"] + 1)


def test_bundled_slide_objects_at_the_top_edge(tmp_path):
    """The real nuclei model over a region of the bundled slide touching its top edge."""
    from napari_hemato.api import load_predictor
    from napari_hemato.samples import sample_path

    roi = (0, 0, 384, 1536)  # the slide's one nucleus at its top edge, ~200 more, and
    with open_slide(sample_path("he_slide")) as slide:  # nuclei cut by the ROI's bottom edge
        result = run(slide, load_predictor("nuclei"), out=tmp_path / "r.zarr", roi=roi)
    table = result.table()
    assert len(table) > 150 and (table["bbox_y0"] == 0).sum() >= 1
    assert (table["bbox_y1"] == roi[2]).sum() >= 3
    assert_table_is_the_label_image(table, exported_labels(result, tmp_path / "l.tif"), roi)
    np.testing.assert_allclose(table["area_um2"], table["area_px"] * result.grid.mpp0**2)


def edge_image() -> np.ndarray:
    """Dark squares cut by every image edge, one in the middle, on white."""
    img = np.full((200, 260, 3), 255, np.uint8)
    for y0, y1, x0, x1 in [(0, 9, 30, 45), (60, 75, 0, 8), (190, 200, 100, 116), (120, 135, 250, 260),
                           (0, 10, 250, 260), (90, 110, 120, 141)]:
        img[y0:y1, x0:x1] = 0
    return img


@pytest.mark.parametrize("mpp, roi", [
    (0.5, None),                  # the work grid is the image
    (0.3, None),                  # resampled: 1.67 level-0 px per work px
    (0.5, (95, 125, 200, 260)),   # an ROI cutting through the middle square
    (0.3, (95, 125, 200, 260)),
])
def test_objects_cut_by_the_image_or_roi_edge(tmp_path, mpp, roi):
    """A model that predicts foreground past the edge (in the padding) still gives a table
    whose boxes lie inside the image and whose areas count the exported label pixels."""
    slide = open_slide(write_tiff(tmp_path / "edges.tif", edge_image()), mpp=mpp)
    # level 0.3: the blur of a dark edge spills one pixel into the white padding
    predictor = DarkBlobPredictor(fake_spec(tile=64, max_object_um=12.0), level=0.3)
    result = run(slide, predictor, out=tmp_path / "r.zarr", roi=roi)
    roi = result.grid.roi
    table = result.table()
    assert len(table) >= (6 if result.grid.roi[0] == 0 else 2)
    assert_table_is_the_label_image(table, exported_labels(result, tmp_path / "l.tif"), roi)
    on_edge = (table["bbox_y0"] == roi[0]) | (table["bbox_x1"] == roi[3])
    assert on_edge.sum() >= 2


@pytest.mark.parametrize("factor", [1.0, 2.0, 1.5, 5 / 3, 0.8, 0.499 / 0.25])
def test_level0_start_matches_the_label_mapping(factor):
    """level0_start inverts work_index exactly (float ties included)."""
    grid = WorkGrid(level=0, downsample=1.0, factor=factor, roi=(7, 3, 7 + 997, 3 + 1001),
                    mpp0=0.25, mpp=0.25 * factor, mpp_assumed=False)
    for axis in (0, 1):
        extent = grid.roi[2 + axis] - grid.roi[axis]
        counts = np.bincount(work_index(np.arange(extent), factor), minlength=grid.shape[axis])
        assert counts.size == grid.shape[axis]
        np.testing.assert_array_equal(grid.level0_counts(0, grid.shape[axis], axis), counts)
        starts = grid.level0_start(np.arange(grid.shape[axis] + 1), axis)
        np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(counts)]))
