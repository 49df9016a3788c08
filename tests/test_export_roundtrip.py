"""Every export format reads back what it wrote: ids, classes, probabilities, masks, coordinates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export import (
    export_coco,
    export_geojson,
    export_omezarr,
    export_points_csv,
    export_tiff,
    import_coco,
    import_geojson,
    import_omezarr,
    import_points_csv,
    import_tiff,
    rle_from_string,
)

CLASSES = ["neutrophil", "lymphocyte", "monocyte"]
ORIGIN = (40, 60)
BIG_ID = 4_000_000_001


def make_labels() -> np.ndarray:
    """120 x 160 labels: rectangle, disk, ring with a hole (+ island), border objects, ..."""
    lab = np.zeros((120, 160), np.uint32)
    yy, xx = np.indices(lab.shape)
    lab[5:20, 10:40] = 1
    lab[20:30, 10:40] = 10  # touches object 1
    lab[(yy - 45) ** 2 + (xx - 30) ** 2 <= 64] = 2
    r = np.hypot(yy - 45, xx - 80)
    lab[(r <= 12) & (r >= 5)] = 3  # ring: one hole
    lab[44:47, 79:82] = 12  # island inside the hole
    lab[0:6, 140:160] = BIG_ID  # touches the top and right borders
    lab[70:75, 10:15] = 5  # two separate parts
    lab[80:84, 20:30] = 5
    lab[100, 100] = 6  # a single pixel
    lab[60:90, 60:65] = 7  # L shape
    lab[85:90, 60:80] = 7
    lab[100, 50] = lab[101, 51] = lab[102, 50] = 8  # diagonal (8-connected) pixels
    lab[110:120, 120:135] = 9  # touches the bottom border
    lab[60:67, 120:127] = 11  # a frame missing one corner: its tips touch diagonally,
    lab[61:66, 121:126] = 0  # so the inside is outside and the outline touches itself
    lab[60, 120] = 0
    return lab


def make_table(labels: np.ndarray, origin=ORIGIN, mpp=0.5, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    rows = []
    for k, v in enumerate(ids.tolist()):
        ys, xs = np.nonzero(labels == v)
        p = rng.dirichlet([1, 1, 1])
        cls = "unassigned" if k == 3 else CLASSES[int(p.argmax())]
        y, x = ys.mean() + origin[0] + rng.normal(0, 1e-3), xs.mean() + origin[1] + 1 / 3
        rows.append({
            "id": v, "y": y, "x": x, "y_um": y * mpp, "x_um": x * mpp,
            "bbox_y0": ys.min() + origin[0], "bbox_x0": xs.min() + origin[1],
            "bbox_y1": ys.max() + 1 + origin[0], "bbox_x1": xs.max() + 1 + origin[1],
            "area_px": float(ys.size), "area_um2": ys.size * mpp**2,
            "class": cls, "confidence": float(p.max()), "score": float(rng.random()),
            **{f"prob_{c}": float(q) for c, q in zip(CLASSES, p, strict=True)},
            "model": "hemato-test", "model_version": "1.2",
            "provenance": ["manual", "corrected", "auto"][k % 3], "reviewed": bool(k % 2),
            "tile": k // 4,
        })
    table = pd.DataFrame(rows)
    table.loc[2, "prob_monocyte"] = np.nan  # a missing probability survives too
    return table


def make_instances(**kw) -> AnnotationSet:
    labels = make_labels()
    return AnnotationSet(kind="instances", table=make_table(labels), class_names=list(CLASSES),
                         labels=labels, origin=ORIGIN, mpp=0.5, image_path="/data/slide_A.svs",
                         image_shape=(400, 500), metadata={"model": "hemato-test", "run": 3}, **kw)


def make_points(mpp=0.25) -> AnnotationSet:
    rng = np.random.default_rng(1)
    n = 15
    y, x = rng.uniform(0, 300, n), rng.uniform(0, 400, n)
    p = rng.random(n)
    table = pd.DataFrame({
        "id": np.arange(1, n + 1) * 7, "y": y, "x": x,
        "y_um": y * mpp if mpp else np.nan, "x_um": x * mpp if mpp else np.nan,
        "class": np.where(p > 0.5, "mitosis", "mimic"), "confidence": np.maximum(p, 1 - p),
        "score": rng.random(n), "prob_mitosis": p, "prob_mimic": 1 - p,
        "provenance": ["auto", "manual", "corrected"] * 5, "reviewed": [True, False, False] * 5,
    })
    return AnnotationSet(kind="points", table=table, class_names=["mitosis", "mimic"], mpp=mpp,
                         image_path="/data/he_1.tif", image_shape=(300, 400))


def reference_rle(full: np.ndarray) -> list[int]:
    """Run lengths by brute force: column-major, starting with a background run."""
    flat = full.ravel(order="F").astype(int)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return [*counts, run]


FORMATS = {
    "tiff": (export_tiff, import_tiff, "cells.tif"),
    "omezarr": (export_omezarr, import_omezarr, "cells.zarr"),
    "coco": (export_coco, import_coco, "cells.json"),
    "geojson": (export_geojson, import_geojson, "cells.geojson"),
}


def assert_same(back: AnnotationSet, ann: AnnotationSet, *, labels: bool = True) -> None:
    pd.testing.assert_frame_equal(back.table, ann.table, check_exact=True)
    assert back.kind == ann.kind
    assert back.class_names == ann.class_names
    assert back.mpp == ann.mpp and back.image_shape == ann.image_shape
    assert back.image_path == ann.image_path
    if labels:
        assert back.origin == ann.origin
        assert back.labels.dtype == np.uint32
        np.testing.assert_array_equal(back.labels, ann.labels)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_instances_round_trip_exactly(tmp_path, fmt):
    write, read, name = FORMATS[fmt]
    ann = make_instances()
    assert BIG_ID in ann.labels and ann.origin == ORIGIN
    write(ann, tmp_path / name)
    back = read(tmp_path / name)
    assert_same(back, ann)
    assert back.metadata == ann.metadata


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_unknown_pixel_size_and_unlisted_labels(tmp_path, fmt):
    """mpp None, no image shape, and a painted label that has no table row yet."""
    write, read, name = FORMATS[fmt]
    ann = make_instances()
    ann.mpp, ann.image_shape = None, None
    ann.labels[50:55, 140:145] = 77  # painted, not in the table
    ann.table = ann.table.drop(columns=["y_um", "x_um", "area_um2"])
    write(ann, tmp_path / name)
    assert_same(read(tmp_path / name), ann)


@pytest.mark.parametrize("kind", ["points", "instances without labels"])
@pytest.mark.parametrize("fmt", ["omezarr", "coco", "geojson"])
def test_points_round_trip_exactly(tmp_path, fmt, kind):
    write, read, name = FORMATS[fmt]
    pts = make_points()
    if kind != "points":
        pts.kind = "instances"
    write(pts, tmp_path / name)
    back = read(tmp_path / name)
    assert_same(back, pts, labels=False)
    assert back.labels is None


def test_points_csv_round_trip(tmp_path):
    pts = make_points()
    export_points_csv(pts, tmp_path / "mitoses.csv")
    raw = pd.read_csv(tmp_path / "mitoses.csv")
    assert list(raw.columns) == ["id", "y_px", "x_px", "y_um", "x_um", "class", "score",
                                 "confidence", "provenance", "reviewed", "prob_mitosis",
                                 "prob_mimic"]
    back = import_points_csv(tmp_path / "mitoses.csv")
    assert back.kind == "points" and back.mpp == 0.25
    assert back.class_names == ["mitosis", "mimic"]
    cols = ["id", "y", "x", "y_um", "x_um", "class", "confidence", "score", "prob_mitosis",
            "prob_mimic", "provenance", "reviewed"]
    pd.testing.assert_frame_equal(back.table[cols], pts.table[cols], check_exact=True,
                                  check_dtype=False)
    assert back.table["id"].dtype == np.int64 and back.table["reviewed"].dtype == bool


def test_points_csv_without_pixel_size_and_from_instances(tmp_path):
    pts = make_points(mpp=None)
    export_points_csv(pts, tmp_path / "p.csv")
    assert pd.read_csv(tmp_path / "p.csv")[["y_um", "x_um"]].isna().all().all()
    assert (tmp_path / "p.csv").read_text().splitlines()[1].split(",")[3:5] == ["", ""]
    back = import_points_csv(tmp_path / "p.csv")
    assert back.mpp is None
    np.testing.assert_array_equal(back.table["y"], pts.table["y"])
    cells = make_instances()
    export_points_csv(cells, tmp_path / "c.csv")
    back = import_points_csv(tmp_path / "c.csv")
    for col in ("id", "y", "x", "y_um", "x_um", "prob_monocyte"):
        np.testing.assert_array_equal(back.table[col], cells.table[col])
    assert back.table["class"].tolist() == cells.table["class"].tolist()


def test_tiff_metadata(tmp_path):
    import tifffile

    ann = make_instances()
    tif = export_tiff(ann, tmp_path / "cells.tif")
    assert tif == tmp_path / "cells.tif" and (tmp_path / "cells.csv").is_file()
    with tifffile.TiffFile(tif) as tf:
        page = tf.pages[0]
        assert page.dtype == np.uint32
        assert page.resolution == pytest.approx((2e4, 2e4)) and int(page.resolutionunit) == 3
        head = json.loads(page.description)["napari_hemato"]
    assert head["origin"] == list(ORIGIN) and head["class_names"] == ann.class_names


def test_omezarr_ngff_metadata(tmp_path):
    ann = make_instances()
    root = export_omezarr(ann, tmp_path / "cells.zarr")
    group = json.loads((root / "labels" / "zarr.json").read_text())
    assert group["attributes"]["ome"] == {"version": "0.5", "labels": ["cells"]}
    meta = json.loads((root / "labels" / "cells" / "zarr.json").read_text())["attributes"]["ome"]
    (ms,) = meta["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}
    scale, shift = ms["datasets"][0]["coordinateTransformations"]
    assert scale == {"type": "scale", "scale": [0.5, 0.5]}
    assert shift == {"type": "translation", "translation": [ORIGIN[0] * 0.5, ORIGIN[1] * 0.5]}
    values = sorted(set(np.unique(ann.labels).tolist()) - {0})
    assert [c["label-value"] for c in meta["image-label"]["colors"]] == values
    props = {p["label-value"]: p for p in meta["image-label"]["properties"]}
    row = ann.table.iloc[0]
    assert props[int(row["id"])]["class"] == row["class"]
    assert props[int(row["id"])]["prob_neutrophil"] == row["prob_neutrophil"]
    arr = json.loads((root / "labels" / "cells" / "0" / "zarr.json").read_text())
    assert arr["data_type"] == "uint32" and arr["dimension_names"] == ["y", "x"]
    assert (root / "labels" / "cells" / "objects.csv").is_file()


def test_foreign_files_import(tmp_path):
    """Files other tools write (no napari_hemato keys) still import."""
    labels = np.zeros((10, 12), np.uint32)
    labels[2:5, 3:7] = 4
    geo = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "Tumor"}},
        "geometry": {"type": "Polygon", "coordinates": [[[3, 2], [7, 2], [7, 5], [3, 5], [3, 2]]]}}]}
    (tmp_path / "q.geojson").write_text(json.dumps(geo))
    back = import_geojson(tmp_path / "q.geojson")
    assert back.origin == (2, 3) and back.labels.shape == (3, 4) and (back.labels == 1).all()
    assert back.table["class"].tolist() == ["Tumor"]
    coco = {"images": [{"id": 9, "file_name": "a.png", "height": 10, "width": 12}],
            "categories": [{"id": 2, "name": "cell"}],
            "annotations": [{"id": 4, "image_id": 9, "category_id": 2, "bbox": [3, 2, 4, 3],
                             "segmentation": {"size": [10, 12], "counts": [32, 3, 7, 3, 7, 3, 7, 3, 55]}}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    back = import_coco(tmp_path / "c.json")
    np.testing.assert_array_equal(back.labels, labels)
    assert back.table["class"].tolist() == ["cell"] and back.image_shape == (10, 12)


def test_geojson_structure_of_synthetic_set(tmp_path):
    ann = make_instances()
    doc = json.loads(export_geojson(ann, tmp_path / "c.geojson").read_text())
    by_id = {f["properties"]["napari_hemato"]["id"]: f for f in doc["features"]}
    assert by_id[5]["geometry"]["type"] == "MultiPolygon"
    assert len(by_id[3]["geometry"]["coordinates"]) == 2  # ring: exterior + hole
    assert set(by_id[1]["properties"]["measurements"]) >= {"confidence", "score", "prob_neutrophil"}
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"detection"}
    doc = json.loads(export_geojson(ann, tmp_path / "a.geojson", object_type="annotation").read_text())
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"annotation"}
    oy, ox = ORIGIN
    assert np.array(by_id[6]["geometry"]["coordinates"][0]).min(0).tolist() == [100 + ox, 100 + oy]


def test_coco_structure(tmp_path):
    ann = make_instances()
    doc = json.loads(export_coco(ann, tmp_path / "c.json").read_text())
    assert doc["images"] == [{"id": 1, "file_name": "slide_A.svs", "height": 400, "width": 500}]
    cats = {c["name"]: c["id"] for c in doc["categories"]}
    assert cats == {"neutrophil": 1, "lymphocyte": 2, "monocyte": 3, "unassigned": 4}
    by_id = {a["napari_hemato_id"]: a for a in doc["annotations"]}
    six = by_id[6]
    assert six["bbox"] == [100 + ORIGIN[1], 100 + ORIGIN[0], 1, 1] and six["area"] == 1
    assert six["iscrowd"] == 0 and set(six["probs"]) == set(CLASSES)
    full = np.zeros((400, 500), bool)
    full[ORIGIN[0] + 100, ORIGIN[1] + 100] = True
    assert rle_from_string(six["segmentation"]["counts"]) == reference_rle(full)
    assert six["segmentation"]["size"] == [400, 500]
