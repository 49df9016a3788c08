"""Slide opening: real SVS, pyramids written here, OME-Zarr, plain images, bad input."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from napari_hemato.core.errors import SlideError
from napari_hemato.core.slide import Slide, open_slide, to_rgb8

SVS_SHAPE = (2967, 2220)  # (Y, X): the README's "2220x2967" is width x height


def down2(img: np.ndarray) -> np.ndarray:
    """2x2 mean (odd edge dropped), rounded back to the input dtype."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    mean = img[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).astype(np.float32).mean(axis=(1, 3))
    return np.rint(mean).astype(img.dtype)


def write_ome_pyramid(path: Path, base: np.ndarray, n_down: int, *, metadata: dict) -> list:
    """OME-TIFF with ``n_down`` reduced levels in SubIFDs; returns the levels written."""
    levels = [base]
    for _ in range(n_down):
        levels.append(down2(levels[-1]))
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(base, subifds=n_down, metadata={"axes": "YXS", **metadata}, **opts)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **opts)
    return levels


@pytest.fixture(scope="module")
def svs_level0(svs_path: Path) -> np.ndarray:
    return tifffile.imread(svs_path)


# -- real SVS ----------------------------------------------------------------------------------


def test_svs_metadata_and_region(svs_path: Path, svs_level0: np.ndarray) -> None:
    with open_slide(svs_path) as slide:
        assert slide.backend == "tifffile"
        assert slide.shape == SVS_SHAPE == svs_level0.shape[:2]
        assert (slide.n_channels, slide.dtype) == (3, np.uint8)
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "svs"
        assert slide.downsamples == [1.0] and slide.level_mpp(0) == pytest.approx(0.499)
        region = slide.read_region(0, 1000, 700, 1300, 1100)
        np.testing.assert_array_equal(region, svs_level0[1000:1300, 700:1100])
        np.testing.assert_array_equal(slide.levels[0][1000:1300, 700:1100].compute(), region)
        info = slide.info()
        assert json.loads(json.dumps(info)) == info
        assert info["levels"] == [{"shape": [2967, 2220, 3], "downsample": 1.0, "mpp": 0.499}]


def test_svs_opening_is_lazy(svs_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile.zarr

    reads = []
    original = tifffile.zarr.FileCache.read
    monkeypatch.setattr(
        tifffile.zarr.FileCache,
        "read",
        lambda self, *a, **k: reads.append(a) or original(self, *a, **k),
    )
    slide = open_slide(svs_path)
    sub = slide.levels[0][:100, :100]  # building graphs reads nothing either
    assert isinstance(slide.levels[0], da.Array) and isinstance(sub, da.Array)
    assert reads == []
    tile_y, tile_x = 240, 240  # the SVS's JPEG tiles
    cy, cx, cc = slide.levels[0].chunksize
    assert cy % tile_y == 0 and cx % tile_x == 0 and cc == 3
    assert cy < SVS_SHAPE[0] and cx < SVS_SHAPE[1]
    slide.read_region(0, 0, 0, 10, 10)
    assert 0 < len(reads) <= 1
    slide.close()


def test_read_region_outside_is_filled(svs_path: Path, svs_level0: np.ndarray) -> None:
    with open_slide(svs_path) as slide:
        h, w = slide.shape
        region = slide.read_region(0, -20, w - 30, 40, w + 10, fill=7)
        assert region.shape == (60, 40, 3) and region.dtype == np.uint8
        np.testing.assert_array_equal(region[20:, :30], svs_level0[:40, w - 30 :])
        assert (region[:20] == 7).all() and (region[:, 30:] == 7).all()
        assert (slide.read_region(0, h + 5, 0, h + 9, 3) == 255).all()
        assert slide.read_region(0, 5, 5, 5, 9).shape == (0, 4, 3)
        with pytest.raises(SlideError, match="level 3"):
            slide.read_region(3, 0, 0, 1, 1)


# -- pyramids written in the test ---------------------------------------------------------------


def test_ome_tiff_subifd_pyramid(tmp_path: Path, svs_level0: np.ndarray) -> None:
    path = tmp_path / "pyramid.ome.tif"
    meta = {"PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499}
    written = write_ome_pyramid(path, svs_level0, 3, metadata=meta)
    with open_slide(path) as slide:
        assert len(slide.levels) == 4 and slide.mpp_source == "ome"
        assert [lv.shape for lv in slide.levels] == [lv.shape for lv in written]
        for k in range(4):
            assert slide.level_mpp(k) == pytest.approx(0.499 * 2**k, rel=5e-3)
            assert slide.levels[k].chunksize[0] < slide.levels[k].shape[0] or k == 3
        h2, w2 = slide.levels[2].shape[:2]
        level2 = slide.read_region(2, 0, 0, h2, w2)
        oracle = down2(down2(svs_level0))  # the same downsampling, recomputed from level 0
        assert np.abs(level2.astype(int) - oracle).max() <= 1
        np.testing.assert_array_equal(slide.levels[2].compute(), level2)
        assert slide.best_level(2.0) == 2 and slide.best_level(1.0) == 1
        assert slide.best_level(0.3) == 0 and slide.best_level(100.0) == 3


def test_ome_tiff_nanometre_units(tmp_path: Path) -> None:
    path = tmp_path / "nm.ome.tif"
    meta = {
        "PhysicalSizeX": 250.0,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 250.0,
        "PhysicalSizeYUnit": "nm",
    }
    write_ome_pyramid(path, np.zeros((512, 512, 3), np.uint8), 1, metadata=meta)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.level_mpp(1) == pytest.approx(0.5)


def test_anisotropic_pixels_refused_unless_user_mpp(tmp_path: Path) -> None:
    path = tmp_path / "aniso.ome.tif"
    meta = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.6}
    write_ome_pyramid(path, np.zeros((256, 256, 3), np.uint8), 0, metadata=meta)
    with pytest.raises(SlideError, match="aniso.ome.tif.*anisotropic"):
        open_slide(path)
    with open_slide(path, mpp=0.55) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.55, "user")


def test_pyramid_as_reduced_pages(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (600, 520, 3), dtype=np.uint8)
    path = tmp_path / "pages.tif"
    levels = [base, down2(base), down2(down2(base))]
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            tw.write(
                level,
                tile=(128, 128),
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(1e4 / 0.25 / 2**i,) * 2,
                resolutionunit="CENTIMETER",
            )
    with open_slide(path) as slide:
        assert [lv.shape for lv in slide.levels] == [lv.shape for lv in levels]
        assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "tiff-resolution"
        np.testing.assert_array_equal(
            slide.read_region(1, 10, 20, 90, 100), levels[1][10:90, 20:100]
        )


def test_tiff_resolution_inch_and_default_72dpi(tmp_path: Path) -> None:
    img = np.zeros((32, 32), np.uint8)
    tifffile.imwrite(tmp_path / "inch.tif", img, resolution=(50800, 50800), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "dpi72.tif", img, resolution=(72, 72), resolutionunit="INCH")
    assert open_slide(tmp_path / "inch.tif").mpp == pytest.approx(0.5)
    assert open_slide(tmp_path / "dpi72.tif").mpp_source == "none"


# -- OME-Zarr ----------------------------------------------------------------------------------


def test_ome_zarr_v04_cyx(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cyx = rng.integers(0, 255, (3, 300, 260), dtype=np.uint8)
    levels = [cyx, np.moveaxis(down2(np.moveaxis(cyx, 0, -1)), -1, 0)]
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=2)
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "yx"
    ]
    datasets = []
    for i, level in enumerate(levels):
        root.create_array(str(i), data=level, chunks=(3, 128, 128))
        scale = [1.0, 0.5 * 2**i, 0.5 * 2**i]
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    with open_slide(tmp_path / "s.zarr") as slide:
        assert (slide.backend, slide.mpp, slide.mpp_source) == ("ome-zarr", 0.5, "ome-zarr")
        assert [lv.shape for lv in slide.levels] == [(300, 260, 3), (150, 130, 3)]
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 260), np.moveaxis(cyx, 0, -1))
        np.testing.assert_array_equal(slide.levels[1].compute(), np.moveaxis(levels[1], 0, -1))


def test_ome_zarr_v05_tczyx_nanometre(tmp_path: Path) -> None:
    grey = np.arange(200 * 100, dtype=np.uint16).reshape(1, 1, 1, 200, 100)
    root = zarr.open_group(tmp_path / "g.ome.zarr", mode="w", zarr_format=3)
    root.create_array("0", data=grey, chunks=(1, 1, 1, 64, 64))
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"
    ]
    tf = [{"type": "scale", "scale": [1, 1, 1, 250, 250]}]
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": tf}]}
    root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    with open_slide(tmp_path / "g.ome.zarr") as slide:
        assert slide.levels[0].shape == (200, 100, 1) and slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(
            slide.read_region(0, 5, 6, 7, 9)[..., 0], grey[0, 0, 0, 5:7, 6:9]
        )


# -- plain images and layouts ------------------------------------------------------------------


def test_plain_jpegs(shared_data: Path) -> None:
    for name in ("he_histo_stardist.jpg", "smear_field_cbc.jpg"):
        path = shared_data / "slides" / name
        expected = np.asarray(Image.open(path).convert("RGB"))
        slide = open_slide(path)
        assert (slide.backend, slide.mpp, slide.mpp_source) == ("image", None, "none")
        assert slide.shape == expected.shape[:2] and len(slide.levels) == 1
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 50, 60), expected[:50, :60])
        assert slide.best_level(1.0) == 0 and slide.level_mpp(0) is None
        user = open_slide(path, mpp=0.25)
        assert (user.mpp, user.mpp_source, user.level_mpp(0)) == (0.25, "user", 0.25)
    assert open_slide(shared_data / "slides" / "he_histo_stardist.jpg").shape == (300, 500)


def test_single_page_tiff_ignores_default_resolution(shared_data: Path) -> None:
    path = shared_data / "slides" / "he_skin.tif"
    with open_slide(path) as slide:  # XResolution 1/1, ResolutionUnit NONE: no pixel size
        assert (slide.backend, slide.shape, slide.n_channels) == ("tifffile", (960, 1280), 3)
        assert (slide.mpp, slide.mpp_source) == (None, "none")
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 960, 1280), tifffile.imread(path))


def test_uint16_greyscale_tiff(tmp_path: Path) -> None:
    img = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 21).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", img)
    with open_slide(tmp_path / "g16.tif") as slide:
        assert (slide.n_channels, slide.dtype) == (1, np.uint16)
        region = slide.read_region(0, 0, 0, 64, 48)
        np.testing.assert_array_equal(region[..., 0], img)
        rgb = to_rgb8(region)
        assert rgb.shape == (64, 48, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb[..., 1], np.rint(img / 257).astype(np.uint8))
        outside = slide.read_region(0, -2, 0, 1, 1)  # default fill 255 means white: 65535
        assert outside.dtype == np.uint16 and (outside[:2] == 65535).all()
        assert (to_rgb8(outside)[:2] == 255).all()


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, :, 3], rgba[1, :, 3], rgba[2:, :, 3] = 0, 255, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    slide = open_slide(tmp_path / "a.png")
    assert slide.n_channels == 4
    rgb = to_rgb8(slide.read_region(0, 0, 0, 4, 4))
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[1, 0], [200, 0, 0])
    np.testing.assert_allclose(rgb[2, 0], [227, 127, 127], atol=1)


@pytest.mark.parametrize(
    "options",
    [{"photometric": "rgb", "planarconfig": "separate"}, {"photometric": "minisblack"}],
    ids=["rgb-planar", "three-pages"],
)
def test_channel_first_tiff(tmp_path: Path, options: dict) -> None:
    cyx = np.random.default_rng(2).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cf.tif", cyx, **options)
    with open_slide(tmp_path / "cf.tif") as slide:
        assert slide.levels[0].shape == (40, 50, 3)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 40, 50), np.moveaxis(cyx, 0, -1))


def test_float_tiff_and_16bit_png(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    tifffile.imwrite(tmp_path / "f.tif", ramp)
    with open_slide(tmp_path / "f.tif") as slide:
        region = slide.read_region(0, 0, 0, 31, 20)
        assert region.dtype == np.float32 and region[30, 0, 0] == 1.0  # fill 255 -> 1.0
        np.testing.assert_array_equal(to_rgb8(region)[:30, :, 0], np.rint(ramp * 255))
    img16 = (np.arange(40 * 30, dtype=np.uint16) * 50).reshape(40, 30)
    Image.fromarray(img16).save(tmp_path / "g16.png")
    slide = open_slide(tmp_path / "g16.png")
    assert (slide.dtype, slide.n_channels) == (np.uint16, 1)
    np.testing.assert_array_equal(slide.read_region(0, 0, 0, 40, 30)[..., 0], img16)


def test_to_rgb8() -> None:
    grey = np.array([[[0.0], [0.5], [1.0]]], np.float32)
    np.testing.assert_array_equal(to_rgb8(grey)[0, :, 0], [0, 128, 255])
    rgb = np.full((2, 2, 3), 9, np.uint8)
    np.testing.assert_array_equal(to_rgb8(rgb), rgb)
    for bad in (
        np.zeros((2, 2, 3), np.complex64),
        np.zeros((2, 2, 3), np.int64),
        np.full((2, 2, 3), 2.0),
        np.zeros((2, 2, 2), np.uint8),
    ):
        with pytest.raises(SlideError):
            to_rgb8(bad)


def test_slide_built_from_dask_arrays() -> None:
    data = da.from_array(np.arange(24, dtype=np.uint8).reshape(4, 2, 3), chunks=2)
    slide = Slide(Path("mem"), [data], None, "none", "image")
    np.testing.assert_array_equal(slide.read_region(0, 1, 0, 3, 2), data[1:3].compute())


# -- bad input ---------------------------------------------------------------------------------


def _tiff(arr: np.ndarray, **kwargs):
    return lambda p: tifffile.imwrite(p, arr, **kwargs)


def _truncated(p: Path) -> None:
    img = np.random.default_rng(3).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(p, img, tile=(128, 128), photometric="rgb", compression="zlib")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _truncated_jpeg(p: Path) -> None:
    img = np.random.default_rng(5).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(img).save(p, quality=90)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero_sized(p: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(p, np.zeros((0, 64), np.uint8))


BAD_FILES = {
    "empty.svs": lambda p: p.write_bytes(b""),
    "random.svs": lambda p: p.write_bytes(np.random.default_rng(4).bytes(5000)),
    "random.png": lambda p: p.write_bytes(b"\x89PNG" + bytes(300)),
    "unknown.xyz": lambda p: p.write_bytes(b"hello world"),
    "truncated.tif": _truncated,
    "truncated.jpg": _truncated_jpeg,
    "zero.tif": _zero_sized,
    "two_channels.tif": _tiff(np.zeros((64, 64, 2), np.uint8)),
    "five_channels.tif": _tiff(
        np.zeros((64, 64, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    ),
    "complex.tif": _tiff(np.zeros((64, 64), np.complex64)),
    "int64.tif": _tiff(np.zeros((64, 64), np.int64)),
    "zstack.tif": _tiff(np.zeros((10, 64, 64), np.uint8)),
    "zstack_ome.ome.tif": _tiff(np.zeros((5, 64, 64), np.uint8), metadata={"axes": "ZYX"}),
    "missing.svs": None,
    "not_zarr_dir": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_raises_slide_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if BAD_FILES[name] is not None:
        BAD_FILES[name](path)
    with pytest.raises(SlideError) as info:
        slide = open_slide(path)
        slide.read_region(0, 0, 0, 64, 64)  # reached only when opening did not refuse
    message = str(info.value)
    assert name in message and "\n" not in message


def test_corrupt_tile_raises_on_read(tmp_path: Path) -> None:
    path = tmp_path / "bad_tile.tif"
    img = np.random.default_rng(6).integers(0, 255, (256, 256), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:  # metadata is fine; the damage shows when reading
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 128, 128)[..., 0], img[:128, :128])
        with pytest.raises(SlideError, match="bad_tile.tif.*cannot read"):
            slide.read_region(0, 128, 128, 256, 256)


def test_bad_arguments(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(SlideError, match="mpp"):
        open_slide(tmp_path / "ok.tif", mpp=-1)
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(tmp_path / "ok.tif", backend="bioformats")


def test_openslide_missing_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not really a slide")
    with pytest.raises(SlideError, match=r"slide\.mrxs.*pip install napari-hemato\[openslide\]"):
        open_slide(path)


@pytest.mark.parametrize("shape, metadata, planes", [
    ((5, 256, 256, 3), {}, 5),                      # tifffile: axes QYXS
    ((5, 256, 256, 3), {"axes": "ZYXS"}, 5),
    ((10, 64, 64), {}, 10),
    ((4, 3, 64, 64), {"axes": "ZCYX"}, 4),
    ((2, 5, 64, 64, 3), {}, 10),
])
def test_stack_error_counts_planes_not_rows(tmp_path: Path, shape, metadata, planes) -> None:
    """The message counts images in the stack; rows and channels are not planes."""
    from napari_hemato.core.slide_layout import layout

    path = tmp_path / "stack.tif"
    rgb = {"photometric": "rgb"} if shape[-1] == 3 else {"photometric": "minisblack"}
    tifffile.imwrite(path, np.zeros(shape, np.uint8), metadata=metadata or None, **rgb)
    with pytest.raises(SlideError, match=rf"stack\.tif: a stack of {planes} planes \("):
        open_slide(path)
    with pytest.raises(SlideError, match=rf"a stack of {planes} planes \(shape"):
        layout(path, shape)
