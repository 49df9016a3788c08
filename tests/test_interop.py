"""Exports open in the tools people already use, read by those tools themselves.

tifffile / scikit-image / imageio read the label TIFFs, ome-zarr-py and
napari-ome-zarr the OME-Zarr export, pycocotools and PIL the COCO export, and
shapely checks the GeoJSON polygons (written to QuPath's conventions).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_hemato.core.export import export_omezarr, export_tiff, import_omezarr
from tests.synthetic import write_tiff
from tests.test_export_roundtrip import ORIGIN, assert_same, make_instances


@pytest.fixture
def slide_cells(tmp_path):
    """The synthetic annotation set on a real (random RGB) 400 x 500 slide at 0.5 µm/px."""
    image = np.random.default_rng(4).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    ann = make_instances()
    ann.image_path = str(write_tiff(tmp_path / "slide_A.tif", image, mpp=0.5))
    y0, x0, y1, x1 = ann.box
    return ann, image[y0:y1, x0:x1]


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


# -- OME-Zarr ----------------------------------------------------------------------------------


def _label_table(ann):
    return {int(r["id"]): r for r in ann.table.to_dict("records")}


def test_omezarr_opens_in_ome_zarr_py(tmp_path, slide_cells):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    ann, region = slide_cells
    path = export_omezarr(ann, tmp_path / "cells.ome.zarr", levels=2)
    nodes = list(Reader(parse_url(str(path)))())
    image, = (n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)
              and not any(isinstance(s, Label) for s in n.specs))
    assert [a.shape for a in image.data] == [(3, 120, 160), (3, 60, 80)]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(image.data[0]), 0, -1), region)
    label, = (n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    np.testing.assert_array_equal(np.asarray(label.data[0]), ann.labels)
    np.testing.assert_array_equal(np.asarray(label.data[1]), ann.labels[::2, ::2])
    rows = _label_table(ann)
    assert set(label.metadata["color"]) == set(np.unique(ann.labels).tolist()) - {0}
    for value, props in label.metadata["properties"].items():
        assert props["class"] == rows[value]["class"]
    # and the NGFF validator of ome-zarr-models accepts the whole image
    import zarr
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(str(path), mode="r"))
    assert_same(import_omezarr(path), ann)


def test_omezarr_opens_in_napari_ome_zarr(tmp_path, slide_cells):
    from napari_ome_zarr import napari_get_reader

    ann, region = slide_cells
    path = export_omezarr(ann, tmp_path / "cells.ome.zarr")
    layers = napari_get_reader(str(path))()
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels"]
    (image, meta, _), (labels, lmeta, _) = layers
    np.testing.assert_array_equal(np.moveaxis(np.asarray(image[0]), 0, -1), region)
    assert meta["channel_axis"] == 0 and meta["scale"] == [0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(labels[0]), ann.labels)
    assert lmeta["scale"] == [0.5, 0.5]
    # napari-ome-zarr 0.10 applies only a dataset's first transform (the scale), to the
    # image and the labels alike: they stay aligned (our own reader keeps the origin)
    np.testing.assert_array_equal(lmeta["affine"].translate, meta["affine"].translate)
    rows = _label_table(ann)
    values = set(np.unique(ann.labels).tolist()) - {0}
    assert set(lmeta["colormap"]) == values
    props = lmeta["properties"]
    by_value = dict(zip(props["index"], props["class"], strict=True))
    assert by_value == {v: rows[v]["class"] for v in values}
    assert dict(zip(props["index"], props["prob_neutrophil"], strict=True))[1] == rows[1]["prob_neutrophil"]
    from napari_hemato.core.export._common import class_color

    colour = [c / 255 for c in (*class_color(rows[1]["class"], ann.class_names), 255)]
    assert lmeta["colormap"][1] == colour


def test_omezarr_image_given_or_missing(tmp_path, caplog):
    ann = make_instances()  # its image_path does not exist
    with caplog.at_level("WARNING"):
        path = export_omezarr(ann, tmp_path / "no_image.ome.zarr")
    assert "without the image" in caplog.text
    assert_same(import_omezarr(path), ann)
    region = np.full((*ann.labels.shape, 3), 200, np.uint16) * 257
    path = export_omezarr(ann, tmp_path / "given.ome.zarr", image=region)
    import zarr

    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["ome"]["multiscales"][0]["axes"][0] == {"name": "c", "type": "channel"}
    assert (np.asarray(root["0"][...]) == 200).all()
    from napari_hemato.core.export import ExportError

    with pytest.raises(ExportError, match="the image is"):
        export_omezarr(ann, tmp_path / "bad.ome.zarr", image=region[:10])


# -- COCO --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_coco_decodes_with_pycocotools_on_its_png(tmp_path, slide_cells):
    from PIL import Image
    from pycocotools.coco import COCO

    from napari_hemato.core.export import export_coco, import_coco

    ann, region = slide_cells
    ann.labels[50:55, 140:145] = 77  # painted, not in the table yet: exported too
    path = export_coco(ann, tmp_path / "cells_coco.json")
    coco = COCO(str(path))
    (img,) = coco.loadImgs(coco.getImgIds())
    assert img["file_name"] == "cells_coco.png"
    assert img["napari_hemato"] == {"slide": ann.image_path, "origin": list(ORIGIN),
                                    "slide_shape": [400, 500]}
    png = np.asarray(Image.open(tmp_path / img["file_name"]))
    assert png.shape == (img["height"], img["width"], 3) == (*ann.labels.shape, 3)
    np.testing.assert_array_equal(png, region)
    import imageio.v3 as iio

    np.testing.assert_array_equal(iio.imread(tmp_path / img["file_name"]), region)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    rows = {int(r["id"]): r for r in ann.table.to_dict("records")}
    rebuilt = np.zeros_like(ann.labels)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
    assert len(anns) == len(np.unique(ann.labels)) - 1
    for a in anns:
        mask = coco.annToMask(a).astype(bool)
        value = a["napari_hemato_id"]
        np.testing.assert_array_equal(mask, ann.labels == value)
        assert a["area"] == mask.sum()
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
        if value in rows:
            assert names[a["category_id"]] == rows[value]["class"]
        rebuilt[mask] = value
    np.testing.assert_array_equal(rebuilt, ann.labels)
    assert_same(import_coco(path), ann)


def test_coco_without_a_readable_image_keeps_slide_coordinates(tmp_path, caplog):
    from napari_hemato.core.export import export_coco, import_coco

    ann = make_instances()  # its image_path does not exist
    with caplog.at_level("WARNING"):
        path = export_coco(ann, tmp_path / "c.json")
    assert "without the image" in caplog.text and not (tmp_path / "c.png").exists()
    doc = json.loads(path.read_text())
    assert doc["images"][0]["file_name"] == "slide_A.svs" and doc["images"][0]["height"] == 400
    assert_same(import_coco(path), ann)
    given = export_coco(ann, tmp_path / "g.json", image=np.zeros((*ann.labels.shape, 3), np.uint8))
    assert json.loads(given.read_text())["images"][0]["file_name"] == "g.png"
    assert_same(import_coco(given), ann)


# -- QuPath GeoJSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("object_type", ["detection", "annotation", "cell"])
def test_geojson_is_valid_and_follows_qupath_conventions(tmp_path, object_type):
    import uuid

    import shapely.geometry

    from napari_hemato.core.export import export_geojson, import_geojson, rasterize

    ann = make_instances()
    ann.labels[50:55, 140:145] = 77  # painted, not in the table yet
    path = export_geojson(ann, tmp_path / "cells.geojson", object_type=object_type)
    doc = json.loads(path.read_text())
    rows = {int(r["id"]): r for r in ann.table.to_dict("records")}
    assert doc["type"] == "FeatureCollection"
    ids = [uuid.UUID(f["id"]) for f in doc["features"]]  # QuPath 0.4+: a UUID per object
    assert len(set(ids)) == len(ids) == len(np.unique(ann.labels)) - 1
    oy, ox = ann.origin
    for feat in doc["features"]:
        geom = shapely.geometry.shape(feat["geometry"])
        assert geom.is_valid, feat["properties"]["metadata"]
        props = feat["properties"]
        assert props["objectType"] == object_type
        assert all(isinstance(v, str) for v in props["metadata"].values())
        value = int(props["metadata"]["id"])
        assert geom.area == (ann.labels == value).sum()  # pixel-exact outlines
        y0, x0, y1, x1 = (int(v) for v in (geom.bounds[1] - oy, geom.bounds[0] - ox,
                                            geom.bounds[3] - oy, geom.bounds[2] - ox))
        rings = [np.asarray(r) - (ox, oy) for r in _rings_of(feat["geometry"])]
        np.testing.assert_array_equal(rasterize(rings, (y0, x0, y1, x1)),
                                      ann.labels[y0:y1, x0:x1] == value)
        if value not in rows:
            assert props["metadata"]["in_table"] == "false" and "classification" not in props
            continue
        row = rows[value]
        cls = props["classification"]
        assert cls["name"] == row["class"]
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                              for c in cls["color"])
        measurements = props["measurements"]
        assert {"confidence", "score", "area_px", "area_um2"} <= set(measurements)
        assert all(isinstance(v, float) and np.isfinite(v) for v in measurements.values())
        assert measurements["area_um2"] == row["area_um2"]
        probs = {c: row[f"prob_{c}"] for c in ann.class_names if np.isfinite(row[f"prob_{c}"])}
        assert {k[len("prob_"):]: v for k, v in measurements.items() if k.startswith("prob_")} == probs
        meta = props["metadata"]
        assert set(meta) == {"id", "model", "model_version", "provenance", "reviewed"}
        assert meta["model"] == row["model"] and meta["model_version"] == row["model_version"]
        assert meta["provenance"] == row["provenance"]
        assert meta["reviewed"] == ("true" if row["reviewed"] else "false")
    back = import_geojson(path)
    assert_same(back, ann)


def _rings_of(geom: dict) -> list:
    if geom["type"] == "Polygon":
        return geom["coordinates"]
    return [ring for poly in geom["coordinates"] for ring in poly]


def test_coco_json_and_png_are_written_together_or_not_at_all(tmp_path, slide_cells, monkeypatch):
    import os

    from napari_hemato.core.export import ExportError, export_coco

    ann, _ = slide_cells
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.png").write_text("keep")
    with pytest.raises(ExportError, match="c.png"):
        export_coco(ann, out / "c.json")
    assert sorted(p.name for p in out.iterdir()) == ["c.png"]
    export_coco(ann, out / "c.json", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "c.png"]

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "link", boom)
    with pytest.raises(ExportError, match="Permission denied"):
        export_coco(ann, out / "d.json")
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "c.png"]


def test_exports_colour_each_class_as_the_viewer_does(tmp_path):
    """QuPath and napari-ome-zarr users see the reviewer's colours (one palette everywhere)."""
    from napari_hemato.core.class_colors import class_color
    from napari_hemato.core.export import export_geojson

    ann = make_instances()
    features = json.loads(export_geojson(ann, tmp_path / "c.geojson").read_text())["features"]
    seen = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
            for f in features}
    assert seen and all(colour == list(class_color(name)) for name, colour in seen.items())
    root = export_omezarr(ann, tmp_path / "c.ome.zarr")
    meta = json.loads((root / "labels" / "cells" / "zarr.json").read_text())
    table = ann.table.set_index("id")
    for entry in meta["attributes"]["ome"]["image-label"]["colors"]:
        name = table.loc[entry["label-value"], "class"]
        assert entry["rgba"] == [*class_color(name), 255]
