"""Exports open in the tools people already use, read by those tools themselves.

tifffile / scikit-image / imageio read the label TIFFs, ome-zarr-py and
napari-ome-zarr the OME-Zarr export, pycocotools and PIL the COCO export, and
shapely checks the GeoJSON polygons (written to QuPath's conventions).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hemato.core.export import export_tiff
from tests.test_export_roundtrip import make_instances

# -- label TIFF --------------------------------------------------------------------------------


def _read_with_every_reader(path) -> list[np.ndarray]:
    import imageio.v3 as iio
    import skimage.io
    import tifffile

    return [tifffile.imread(path), skimage.io.imread(path), iio.imread(path)]


def test_label_tiff_opens_in_tifffile_skimage_and_imageio(tmp_path):
    ann = make_instances()
    tif = export_tiff(ann, tmp_path / "cells.tif")
    for labels in _read_with_every_reader(tif):
        assert labels.dtype == np.uint32
        np.testing.assert_array_equal(labels, ann.labels)


def test_cli_label_tiff_opens_in_tifffile_skimage_and_imageio(tmp_path):
    pytest.importorskip("onnx")
    from napari_hemato.cli import main
    from napari_hemato.core.engine import open_result
    from tests.onnx_models import dark_blob_model_dir
    from tests.synthetic import disk_image, write_tiff

    model = dark_blob_model_dir(tmp_path / "model")
    image = write_tiff(tmp_path / "field.tif", disk_image((300, 360), n=12, seed=3), mpp=0.5)
    assert main(["analyze", str(image), "--task", "nuclei", "--model", str(model),
                 "--out", str(tmp_path / "r.zarr"), "--labels", str(tmp_path / "l.tif")]) == 0
    expected = open_result(tmp_path / "r.zarr").labels()[...]
    for labels in _read_with_every_reader(tmp_path / "l.tif"):
        assert labels.dtype == np.uint32 and labels.shape == (300, 360)
        np.testing.assert_array_equal(labels, expected)
    import tifffile

    with tifffile.TiffFile(tmp_path / "l.tif") as tf:
        head = json.loads(tf.pages[0].description)["napari_hemato"]
    assert head["origin"] == [0, 0] and head["mpp"] == 0.5
