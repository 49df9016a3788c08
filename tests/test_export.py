"""Export formats: RLE and polygon oracles, crops, and the safety of every destination."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export import (
    ExportError,
    crop_box,
    decode_rle,
    encode_rle,
    export_coco,
    export_crops,
    export_geojson,
    export_omezarr,
    export_points_csv,
    export_tiff,
    import_crops,
    rasterize,
    rle_from_string,
    rle_to_string,
    slide_split,
    trace_polygons,
)
from tests.synthetic import write_tiff
from tests.test_export_roundtrip import make_instances, make_points, reference_rle

# -- COCO RLE ----------------------------------------------------------------------------------


def test_rle_hand_checked():
    mask = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], bool)
    # column-major: 0 0 0 | 1 1 0 | 0 1 0  ->  3 zeros, 2 ones, 2 zeros, 1 one, 1 zero
    assert encode_rle(mask, (3, 3)) == [3, 2, 2, 1, 1]
    # counts 3, 2, 2 as digits; then 1-2 = -1 and 1-2 = -1, each 0b11111 -> chr(48 + 31) = 'O'
    assert rle_to_string([3, 2, 2, 1, 1]) == "322OO"
    # 40 - 3 = 37 = 0b1_00101: low 5 bits 5 with the continue bit -> 48+32+5 = 'U', then '1';
    # 2 - 5 = -3: low 5 bits 0b11101 = 29, sign bit set and x >> 5 == -1 -> chr(77) = 'M'
    assert rle_to_string([0, 3, 5, 40, 2]) == "035U1M"
    assert rle_from_string("035U1M") == [0, 3, 5, 40, 2]
    assert rle_from_string("322OO") == [3, 2, 2, 1, 1]
    np.testing.assert_array_equal(decode_rle("322OO", (3, 3)), mask)
    # a mask ending on foreground has no trailing zero run (as pycocotools)
    assert encode_rle(np.ones((2, 2), bool), (2, 2)) == [0, 4]
    assert encode_rle(np.zeros((2, 3), bool), (2, 3)) == [6]


def test_rle_offset_and_strings_match_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(40):
        big = tuple(rng.integers(3, 30, 2))
        h, w = rng.integers(1, 4, 2)
        oy, ox = rng.integers(0, big[0] - h + 1), rng.integers(0, big[1] - w + 1)
        local = rng.random((h, w)) < 0.6
        full = np.zeros(big, bool)
        full[oy:oy + h, ox:ox + w] = local
        counts = encode_rle(local, big, (oy, ox))
        ref = reference_rle(full)
        assert counts == (ref[:-1] if ref[-1] == 0 and len(ref) > 1 else ref)
        assert rle_from_string(rle_to_string(counts)) == counts
        np.testing.assert_array_equal(decode_rle(rle_to_string(counts), big), full)
        box = (oy, ox, oy + h, ox + w)
        np.testing.assert_array_equal(decode_rle(counts, big, box), local)
    big_counts = [0, 70000, 123456, 1, 2**31 - 5]
    assert rle_from_string(rle_to_string(big_counts)) == big_counts
    with pytest.raises(ExportError):
        decode_rle([1, 2], (2, 2))


# -- pixel-edge polygons -----------------------------------------------------------------------


def test_trace_then_rasterize_is_exact_on_random_masks():
    rng = np.random.default_rng(2)
    for _ in range(150):
        h, w = rng.integers(1, 10, 2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        polys = trace_polygons(mask)
        rings = [r for poly in polys for r in poly]
        np.testing.assert_array_equal(rasterize(rings, (0, 0, h, w)), mask)
        for poly in polys:  # exterior first, counter-clockwise in (x, y) numbers; holes reverse
            area = [(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]).sum() / 2 for r in poly]
            assert area[0] > 0 and all(a < 0 for a in area[1:])
            assert all((r[0] == r[-1]).all() for r in poly)


def test_trace_shapes():
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    (poly,) = trace_polygons(ring)
    assert len(poly) == 2  # exterior + hole
    assert sorted(map(tuple, poly[1][:-1].tolist())) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    frame = np.ones((4, 4), bool)
    frame[1:3, 1:3] = frame[0, 0] = False
    assert [len(p) for p in trace_polygons(frame)] == [2]  # a hole touching the exterior
    diag = np.eye(2, dtype=bool)
    assert len(trace_polygons(diag)) == 2  # diagonal pixels: two parts (MultiPolygon)
    # rasterize handles any polygon: a triangle, centres strictly inside
    tri = rasterize([[(0, 0), (4, 0), (0, 4)]], (0, 0, 4, 4))
    assert tri.astype(int).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]


def test_geojson_coordinates_are_x_y_in_level0_pixels(tmp_path):
    labels = np.zeros((20, 120), np.uint32)
    labels[10, 100] = 3
    table = pd.DataFrame({"id": [3], "y": [10.0], "x": [100.0], "class": ["a"]})
    ann = AnnotationSet("instances", table, ["a", "b"], labels=labels)
    doc = json.loads(export_geojson(ann, tmp_path / "one.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    (feat,) = doc["features"]
    assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
    ring = np.array(feat["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == 100 and ring[:, 0].max() == 101  # x first
    assert ring[:, 1].min() == 10 and ring[:, 1].max() == 11
    props = feat["properties"]
    assert props["objectType"] == "detection"
    from napari_hemato.core.class_colors import class_color

    assert props["classification"] == {"name": "a", "color": list(class_color("a"))}
    assert props["napari_hemato"]["id"] == 3
    pts = AnnotationSet("points", table, ["a"])
    doc = json.loads(export_geojson(pts, tmp_path / "pts.geojson").read_text())
    x, y = doc["features"][0]["geometry"]["coordinates"]
    assert doc["features"][0]["geometry"]["type"] == "Point" and abs(x - 100) <= 0.5 and abs(y - 10) <= 0.5


# -- crops -------------------------------------------------------------------------------------


def _boxes_set(image_path: Path, shape, boxes, classes) -> AnnotationSet:
    rows = []
    for k, ((y0, x0, y1, x1), cls) in enumerate(zip(boxes, classes, strict=True), start=1):
        rows.append({"id": k, "y": (y0 + y1 - 1) / 2, "x": (x0 + x1 - 1) / 2, "bbox_y0": y0,
                     "bbox_x0": x0, "bbox_y1": y1, "bbox_x1": x1, "class": cls,
                     "confidence": 0.9 - k / 100, "score": 0.5 + k / 7,
                     "prob_neutrophil": 0.9 - k / 100, "prob_lymphocyte": k / 100 + 0.1 / 3,
                     "provenance": "corrected", "reviewed": k % 2 == 0})
    return AnnotationSet("instances", pd.DataFrame(rows), ["neutrophil", "lymphocyte"],
                         image_path=str(image_path), image_shape=shape)


def _expected_crop(image: np.ndarray, box) -> np.ndarray:
    y0, x0, y1, x1 = box
    out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
    ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y1, image.shape[0]), min(x1, image.shape[1])
    out[ya - y0:yb - y0, xa - x0:xb - x0] = image[ya:yb, xa:xb]
    return out


def _check_crops(folder: Path, image: np.ndarray, ann: AnnotationSet):
    from PIL import Image

    manifest = pd.read_csv(folder / "manifest.csv")
    assert list(manifest.columns[:5]) == ["path", "class", "id", "slide", "split"]
    assert {"y", "x", "bbox_y0", "confidence", "provenance", "reviewed", "prob_neutrophil"} <= set(manifest)
    stem = Path(ann.image_path).stem
    assert set(manifest["split"]) == {slide_split(stem)}
    for row in manifest.to_dict("records"):
        assert row["path"] == f"{row['class']}/{stem}_{row['id']}.png"
        crop = np.asarray(Image.open(folder / row["path"]))
        box = (row["crop_y0"], row["crop_x0"], row["crop_y1"], row["crop_x1"])
        np.testing.assert_array_equal(crop, _expected_crop(image, box))
        src = ann.table.set_index("id").loc[row["id"]]
        assert box == crop_box(src.to_dict())
        assert crop.shape[0] >= 1.5 * max(src.bbox_y1 - src.bbox_y0, src.bbox_x1 - src.bbox_x0)
    back = import_crops(folder)
    pd.testing.assert_frame_equal(back.table, ann.table, check_exact=True)
    assert back.kind == "points" and back.labels is None and back.class_names == ann.class_names


def test_crops_from_real_smear(tmp_path, shared_data):
    from PIL import Image

    path = shared_data / "slides" / "smear_field_cbc.jpg"
    image = np.asarray(Image.open(path).convert("RGB"))
    boxes = [(100, 200, 160, 250), (0, 0, 30, 40), (630, 1200, 652, 1226), (300, 600, 301, 601)]
    ann = _boxes_set(path, image.shape[:2], boxes, ["neutrophil", "lymphocyte", "neutrophil", "unassigned"])
    folder = export_crops(ann, tmp_path / "crops")
    _check_crops(folder, image, ann)
    assert (folder / "unassigned").is_dir()


def test_crops_from_synthetic_tiff_split_resize_append(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)
    tif = write_tiff(tmp_path / "slide_B.tif", image, mpp=0.5)
    ann = _boxes_set(tif, (90, 110), [(5, 5, 25, 45), (70, 90, 90, 110), (40, 40, 44, 48)],
                     ["lymphocyte", "neutrophil", "lymphocyte"])
    folder = export_crops(ann, tmp_path / "crops")
    _check_crops(folder, image, ann)
    resized = export_crops(ann, tmp_path / "small", size=24, split="val")
    manifest = pd.read_csv(resized / "manifest.csv")
    assert set(manifest["split"]) == {"val"}
    assert all(Image.open(resized / p).size == (24, 24) for p in manifest["path"])
    # a second slide goes into the same folder; the first slide's rows stay
    tif2 = write_tiff(tmp_path / "slide_C.tif", image[::-1].copy())
    other = _boxes_set(tif2, (90, 110), [(10, 10, 30, 30)], ["neutrophil"])
    export_crops(other, folder, append=True, split={"slide_C": "test"})
    manifest = pd.read_csv(folder / "manifest.csv")
    assert manifest.groupby("slide").size().to_dict() == {"slide_B": 3, "slide_C": 1}
    assert manifest.set_index("slide").loc["slide_C", "split"] == "test"
    with pytest.raises(ExportError, match="2 slides"):
        import_crops(folder)
    pd.testing.assert_frame_equal(import_crops(folder, slide="slide_B").table, ann.table)
    with pytest.raises(ExportError, match="already holds crops of slide_C"):
        export_crops(other, folder, append=True)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert 0.05 < np.mean([slide_split(f"s{i}") == "val" for i in range(400)]) < 0.25
    # points (no bbox): a min_side square centred on the pixel, white outside the image
    assert crop_box({"y": 10.0, "x": 20.0}) == (-6, 4, 26, 36)
    pts = AnnotationSet("points", pd.DataFrame({"id": [1, 2], "y": [10.0, 80.2], "x": [20.0, 3.7],
                                                 "class": ["mitosis", "mimic"]}), ["mitosis"],
                        image_path=str(tif))
    manifest = pd.read_csv(export_crops(pts, tmp_path / "pts") / "manifest.csv")
    for row in manifest.to_dict("records"):
        crop = np.asarray(Image.open(tmp_path / "pts" / row["path"]))
        box = (row["crop_y0"], row["crop_x0"], row["crop_y1"], row["crop_x1"])
        assert crop.shape == (32, 32, 3)
        np.testing.assert_array_equal(crop, _expected_crop(image, box))


def test_crops_folder_safety(tmp_path, monkeypatch):
    image = np.zeros((40, 40, 3), np.uint8)
    tif = write_tiff(tmp_path / "s.tif", image)
    ann = _boxes_set(tif, (40, 40), [(5, 5, 15, 15)], ["neutrophil"])
    folder = export_crops(ann, tmp_path / "crops")
    (folder / "stray.txt").write_text("old")
    with pytest.raises(ExportError, match="crops already exists"):
        export_crops(ann, folder)
    export_crops(ann, folder, overwrite=True)
    assert not (folder / "stray.txt").exists() and (folder / "manifest.csv").is_file()
    with pytest.raises(ExportError, match="outside"):
        export_crops(ann, folder / ".." / "elsewhere", base_dir=folder)

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ExportError, match="Permission denied"):
        export_crops(ann, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops", "s.tif"]


# -- destination safety ------------------------------------------------------------------------

WRITERS = {
    "tiff": (export_tiff, "out.tif"),
    "omezarr": (export_omezarr, "out.zarr"),
    "coco": (export_coco, "out.json"),
    "geojson": (export_geojson, "out.geojson"),
    "points_csv": (export_points_csv, "out.csv"),
}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_existing_output_needs_overwrite(tmp_path, fmt):
    write, name = WRITERS[fmt]
    ann = make_instances()
    dest = write(ann, tmp_path / name)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ExportError, match=name):
        write(ann, tmp_path / name)
    write(ann, tmp_path / name, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert dest.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_unwritable_or_escaping_destinations(tmp_path, monkeypatch, fmt):
    write, name = WRITERS[fmt]
    ann = make_instances()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        write(ann, tmp_path / "afile" / name)
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "outside").mkdir()
    (base / "link").symlink_to(tmp_path / "outside")
    monkeypatch.chdir(base)
    for bad in (Path("..") / name, base / ".." / name, tmp_path / "outside" / name,
                Path("link") / name, base / "link" / name):
        with pytest.raises(ExportError, match="outside"):
            write(ann, bad, base_dir=base)
    assert write(ann, Path("sub") / name, base_dir=base).parent == base / "sub"
    assert write(ann, base / name, base_dir=".").parent == base
    assert not any((tmp_path / "outside").iterdir())


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_coco(make_instances(), ro / "x.json")
    finally:
        ro.chmod(0o755)


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(ExportError, match="not writable"):
        export_geojson(make_instances(), tmp_path / "x.geojson")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, fmt):
    write, name = WRITERS[fmt]

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "link", boom)
    with pytest.raises(ExportError, match="Permission denied"):
        write(make_instances(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_multi_file_outputs_are_all_or_nothing(tmp_path):
    ann = make_instances()
    (tmp_path / "out.csv").write_text("keep")
    with pytest.raises(ExportError, match="out.csv"):
        export_tiff(ann, tmp_path / "out.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    assert (tmp_path / "out.csv").read_text() == "keep"
    with pytest.raises(ExportError, match="needs instances"):
        export_tiff(make_points(), tmp_path / "p.tif")
    crops = tmp_path / "crops"
    with pytest.raises(ExportError, match="image_path"):
        export_crops(AnnotationSet("points", make_points().table, []), crops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
