"""npe2 reader: what it claims, and the layer data it returns (no viewer, no Qt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_hemato.core.errors import SlideError
from napari_hemato.io.reader import napari_get_reader, read_slide


def _pyramid_tiff(path: Path) -> None:
    base = np.random.default_rng(0).integers(0, 255, (512, 384, 3), dtype=np.uint8)
    opts = {"tile": (128, 128), "photometric": "rgb"}
    meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(base, subifds=2, metadata=meta, **opts)
        tw.write(base[::2, ::2], subfiletype=1, **opts)
        tw.write(base[::4, ::4], subfiletype=1, **opts)


def _ome_zarr(path: Path) -> None:
    root = zarr.open_group(path, mode="w", zarr_format=2)
    root.create_array("0", data=np.zeros((1, 64, 64), np.uint8), chunks=(1, 32, 32))
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [{"path": "0"}]}]


def test_unclaimed_paths_give_none(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n")
    plain_dir = tmp_path / "folder"
    plain_dir.mkdir()
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / ".zattrs").write_text("{not json")
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, np.zeros((8, 8), np.uint8))
    for path in (
        str(csv),
        str(tmp_path / "missing.svs"),
        str(tmp_path / "no_dir"),
        str(plain_dir),
        str(tmp_path / "bad.zarr"),
        [str(tif), str(csv)],
        [str(tif), str(tif)],
        [],
        None,
        3,
    ):
        assert napari_get_reader(path) is None, path


def test_svs_layer_data(svs_path: Path) -> None:
    reader = napari_get_reader(str(svs_path))
    assert callable(reader) and napari_get_reader([str(svs_path)]) is reader
    [(data, kwargs, kind)] = reader(str(svs_path))
    assert kind == "image" and data.shape == (2967, 2220, 3)
    assert kwargs["name"] == "cmu_small_region" and kwargs["rgb"] is True
    assert kwargs["multiscale"] is False
    assert kwargs["scale"] == pytest.approx((0.499, 0.499)) and kwargs["units"] == ("um", "um")
    info = kwargs["metadata"]["napari_hemato"]
    assert info["mpp_source"] == "svs" and json.loads(json.dumps(info)) == info


def test_pyramid_is_multiscale_and_valid_for_napari(tmp_path: Path) -> None:
    path = tmp_path / "pyr.ome.tif"
    _pyramid_tiff(path)
    [(data, kwargs, kind)] = napari_get_reader(str(path))(str(path))
    assert isinstance(data, list) and [d.shape for d in data] == [
        (512, 384, 3),
        (256, 192, 3),
        (128, 96, 3),
    ]
    assert kwargs["multiscale"] is True and kwargs["name"] == "pyr"
    assert kwargs["scale"] == pytest.approx((0.25, 0.25))

    from napari.layers import Layer  # napari's layer model is Qt-free

    layer = Layer.create(data, kwargs, kind)
    assert layer.multiscale and layer.rgb and str(layer.units[0]) == "micrometer"
    np.testing.assert_allclose(layer.scale, [0.25, 0.25])


def test_greyscale_zarr_squeezes_channels(tmp_path: Path) -> None:
    path = tmp_path / "grey.zarr"
    _ome_zarr(path)
    reader = napari_get_reader(str(path))
    assert reader is not None
    [(data, kwargs, _)] = reader(str(path))
    assert data.shape == (64, 64) and kwargs["rgb"] is False and kwargs["name"] == "grey"
    assert kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs


def test_claimed_but_broken_file_raises_slide_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.svs"
    path.write_bytes(b"\0" * 100)
    reader = napari_get_reader(str(path))
    assert reader is not None
    with pytest.raises(SlideError, match="broken.svs"):
        reader(str(path))
    assert read_slide is reader
