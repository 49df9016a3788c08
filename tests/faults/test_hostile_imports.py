"""Hostile files for every importer: a clear one-line error, bounded memory and time, nothing written.

Each import runs in a real child process whose address space is capped (``RLIMIT_AS``: what
it has mapped plus 1 GiB), so an importer that tried to allocate what a lying header asks
for would fail with a MemoryError instead of our limit's message. A hung importer is killed
after a generous guard and the test fails; no test measures how long anything took.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from napari_hemato.core.export import _atomic as limits

from .conftest import report

CHILD = """
import json, resource
from pathlib import Path
with open("/proc/self/status") as fh:
    vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
from napari_hemato.core import export as ex
from napari_hemato.core.export import _atomic
from napari_hemato.core.errors import HematoError
for name, value in {limits!r}.items():
    setattr(_atomic, name, value)
try:
    getattr(ex, {func!r})(*{args!r}, **{kwargs!r})
    out = {{"ok": True}}
except HematoError as err:
    out = {{"error": type(err).__name__, "message": str(err)}}
Path({result!r}).write_text(json.dumps(out))
"""


def hostile_import(procs, tmp_path, func, *args, limits=None, **kwargs):
    """Run ``ex.<func>(*args)`` in a capped child; returns the error message (fails otherwise)."""
    result = tmp_path / f"result-{func}.json"
    before = _tree(tmp_path)
    code = CHILD.format(func=func, args=tuple(str(a) for a in args), kwargs=kwargs,
                        limits=limits or {}, result=str(result))
    res = procs.kill_when(None, lambda: False, code=code, limit=60.0)  # guard against a hang only
    assert res["returncode"] == 0 and result.exists(), f"{func} crashed or hung:\n{res['stderr']}"
    out = json.loads(result.read_text())
    result.unlink()
    assert _tree(tmp_path) == before, "the import wrote files"
    assert out.get("error") == "ExportError", out
    message = out["message"]
    assert "\n" not in message and str(args[0]) in message, message
    return message


def _tree(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*"))


def _geojson(path, features, head=None, **extra):
    doc = {"type": "FeatureCollection", "features": features, **extra}
    if head is not None:
        doc["napari_hemato"] = head
    path.write_text(json.dumps(doc))  # json writes NaN as the (accepted) literal NaN
    return path


def _poly(ring, oid=None, cls="A"):
    props = {"classification": {"name": cls}}
    if oid is not None:
        props["napari_hemato"] = {"id": oid}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": props}


SQUARE = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
N = 10**6  # vertices


def _circle(n, r=200.0, c=300.0):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.column_stack([c + r * np.cos(t), c + r * np.sin(t)]).round(3).tolist()


GEOJSON = {
    "a million vertices": (lambda: [_poly(_circle(N))], None, "vertices, more than"),
    "NaN coordinates": (lambda: [_poly([[0, 0], [float("nan"), 0], [4, 4], [0, 0]])], None,
                        "non-finite"),
    "infinite coordinates": (lambda: [_poly([[0, 0], [1e300 * 10, 0], [4, 4], [0, 0]])], None,
                             "non-finite"),
    "id beyond uint32": (lambda: [_poly(SQUARE, oid=2**40)], None, "out of range"),
    "negative id": (lambda: [_poly(SQUARE, oid=-3)], None, "out of range"),
    "id that is text": (lambda: [_poly(SQUARE, oid="seven")], None, "not an integer"),
    "fractional id": (lambda: [_poly(SQUARE, oid=2.5)], None, "not an integer"),
    "duplicate ids": (lambda: [_poly(SQUARE, oid=4), _poly(SQUARE, oid=4)], None, "appears 2 times"),
    "features not a list": (lambda: 5, None, "'features' is not a list"),
    "coordinates that are text": (lambda: [{"type": "Feature", "properties": {},
                                            "geometry": {"type": "Polygon", "coordinates": ["abc"]}}],
                                  None, "not a valid GeoJSON"),
    "properties a list": (lambda: [{"type": "Feature", "properties": [1],
                                    "geometry": {"type": "Polygon", "coordinates": [SQUARE]}}],
                          None, "not a valid GeoJSON"),
    "header shape of a terapixel": (lambda: [_poly(SQUARE, oid=1)],
                                    {"shape": [10**6, 10**6], "origin": [0, 0]}, "out of range"),
    "header shape negative": (lambda: [_poly(SQUARE, oid=1)],
                              {"shape": [-5, 10], "origin": [0, 0]}, "out of range"),
    "zigzag outline": (lambda: [_poly([[float(i), 0.0 if i % 2 else 20000.0] for i in range(4000)])],
                       None, "crosses"),
    "coordinates beyond 2**31": (lambda: [_poly([[0, 0], [3e9, 0], [3e9, 3e9], [0, 0]])], None,
                                 "out-of-range coordinates"),
}


@pytest.mark.parametrize("case", sorted(GEOJSON))
def test_hostile_geojson(case, tmp_path, procs):
    features, head, expected = GEOJSON[case]
    path = _geojson(tmp_path / "in.geojson", features(), head)
    assert expected in hostile_import(procs, tmp_path, "import_geojson", path)
    report("hostile import", importer="import_geojson", case=case, survived=True)


def test_hostile_json_nesting_and_size(tmp_path, procs):
    deep = tmp_path / "deep.geojson"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    assert "nested too deeply" in hostile_import(procs, tmp_path, "import_geojson", deep)
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:  # a sparse file bigger than the limit: refused before reading
        fh.truncate(limits.MAX_FILE_BYTES + 1)
    for func in ("import_geojson", "import_coco", "import_points_csv"):
        assert "MiB, more than" in hostile_import(procs, tmp_path, func, big)
        report("hostile import", importer=func, case="file over the size limit", survived=True)


def _coco(path, annotations, *, height=64, width=64, head=None, images=None):
    doc = {"images": images if images is not None else [{"id": 1, "height": height, "width": width,
                                                         "file_name": "x.png"}],
           "categories": [{"id": 1, "name": "A"}], "annotations": annotations}
    if head is not None:
        doc["napari_hemato"] = head
    path.write_text(json.dumps(doc))
    return path


def _ann(oid, seg, **extra):
    return {"id": oid, "image_id": 1, "category_id": 1, "segmentation": seg, **extra}


COCO = {
    "a terapixel image": (lambda: ([_ann(1, [[0, 0, 4, 0, 4, 4]])], {"height": 10**6, "width": 10**6}),
                          "out of range"),
    "RLE of another size": (lambda: ([_ann(1, {"size": [10**5, 10**5], "counts": [0, 10**10]})], {}),
                            "out of range"),
    "RLE counts that lie": (lambda: ([_ann(1, {"size": [64, 64], "counts": [0, 10**12]})], {}),
                            "RLE counts sum"),
    "RLE of too many runs": (lambda: ([_ann(1, {"size": [64, 64], "counts": [1] * (2 * 10**6)})], {}),
                             "run-length values"),
    "NaN polygon": (lambda: ([_ann(1, [[0, 0, float("nan"), 0, 4, 4]])], {}), "non-finite"),
    "a million vertices": (lambda: ([_ann(1, [np.ravel(_circle(N, 20, 30)).tolist()])], {}),
                           "vertices, more than"),
    "id beyond uint32": (lambda: ([_ann(2**33, [[0, 0, 4, 0, 4, 4]])], {}), "out of range"),
    "id zero": (lambda: ([_ann(0, [[0, 0, 4, 0, 4, 4]])], {}), "out of range"),
    "duplicate ids": (lambda: ([_ann(3, [[0, 0, 4, 0, 4, 4]]), _ann(3, [[0, 0, 4, 0, 4, 4]])], {}),
                      "appears 2 times"),
    "segmentation of text": (lambda: ([_ann(1, ["abc"])], {}), "not a valid COCO"),
    "bbox of text": (lambda: ([_ann(1, None, bbox="wide")], {}), "not a valid COCO"),
    "no images": (lambda: ([], {"images": []}), "cannot read COCO"),
    "header shape of a terapixel": (lambda: ([], {"head": {"shape": [10**6, 10**6], "origin": [0, 0]}}),
                                    "out of range"),
}


@pytest.mark.parametrize("case", sorted(COCO))
def test_hostile_coco(case, tmp_path, procs):
    make, expected = COCO[case]
    annotations, opts = make()
    path = _coco(tmp_path / "in_coco.json", annotations, **opts)
    assert expected in hostile_import(procs, tmp_path, "import_coco", path)
    report("hostile import", importer="import_coco", case=case, survived=True)


CSV = {
    "NaN coordinates": ("id,y_px,x_px\n1,5,5\n2,nan,3\n", "row 2 has no finite"),
    "coordinates that are text": ("id,y_px,x_px\n1,five,5\n", "not a valid points CSV"),
    "negative id": ("id,y_px,x_px\n-1,5,5\n", "out of range"),
    "fractional id": ("id,y_px,x_px\n1.5,5,5\n", "not an integer"),
    "duplicate ids": ("id,y_px,x_px\n7,5,5\n7,6,6\n", "appears 2 times"),
    "no coordinates": ("id,a,b\n1,5,5\n", "needs y_px and x_px"),
    "ragged rows": ('id,y_px,x_px\n1,5,5,9,9\n"unclosed\n', "cannot read table"),
    "binary garbage": (b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 100, "cannot read table"),
}


@pytest.mark.parametrize("case", sorted(CSV))
def test_hostile_points_csv(case, tmp_path, procs):
    text, expected = CSV[case]
    path = tmp_path / "points.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in hostile_import(procs, tmp_path, "import_points_csv", path)
    report("hostile import", importer="import_points_csv", case=case, survived=True)


def test_points_csv_row_limit_triggers(tmp_path, procs):
    """MAX_OBJECTS (lowered to 1000 in the child, as a user may) refuses 1001 rows."""
    path = tmp_path / "points.csv"
    rows = "\n".join(f"{i},{i},{i}" for i in range(1, 1002))
    path.write_text("id,y_px,x_px\n" + rows + "\n")
    msg = hostile_import(procs, tmp_path, "import_points_csv", path, limits={"MAX_OBJECTS": 1000})
    assert "1001 rows, more than the 1000" in msg


MANIFEST_PATHS = {
    "parent folder": "../escape.png",
    "absolute": "/etc/passwd",
    "inner parent": "A/../../escape.png",
    "symlink out": "link/out.png",
}


@pytest.mark.parametrize("case", sorted(MANIFEST_PATHS))
def test_hostile_crops_manifest(case, tmp_path, procs):
    folder = tmp_path / "crops"
    folder.mkdir()
    (folder / "link").symlink_to(tmp_path)
    (folder / "manifest.csv").write_text(
        f"path,class,id,slide,split\nA/s_1.png,A,1,s,train\n{MANIFEST_PATHS[case]},A,2,s,train\n")
    assert "refusing the file name" in hostile_import(procs, tmp_path, "import_crops", folder)
    report("hostile import", importer="import_crops", case=case, survived=True)


def test_appending_crops_to_a_hostile_folder_touches_nothing_outside(tmp_path):
    """export_crops(append=True) deletes the crops its manifest lists: never outside the folder."""
    import pandas as pd

    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.core.export import ExportError, export_crops

    from ..synthetic import disk_image, write_tiff

    image = write_tiff(tmp_path / "s.tif", disk_image((64, 64), n=2, seed=1), mpp=0.5)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "crops"
    folder.mkdir()
    (folder / "manifest.csv").write_text("path,class,id,slide,split\n../victim.txt,A,1,s,train\n")
    table = pd.DataFrame({"id": [1], "y": [20.0], "x": [20.0], "class": ["A"]})
    ann = AnnotationSet("points", table, ["A"], image_path=str(image))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ExportError, match="refusing the file name"):
        export_crops(ann, folder, append=True, overwrite=True)
    assert victim.read_text() == "precious"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_hostile_tiffs(tmp_path, procs):
    import tifffile

    lying = tmp_path / "lying.tif"
    tifffile.imwrite(lying, np.zeros((16, 16), np.uint32))
    with tifffile.TiffFile(lying, mode="r+b") as tf:  # the header now claims 10^5 x 10^5 pixels
        tf.pages[0].tags["ImageWidth"].overwrite(100_000)
        tf.pages[0].tags["ImageLength"].overwrite(100_000)
    assert "out of range" in hostile_import(procs, tmp_path, "import_tiff", lying)
    wide = tmp_path / "wide.tif"
    tifffile.imwrite(wide, np.array([[0, 2**40]], np.uint64))
    assert "label values" in hostile_import(procs, tmp_path, "import_tiff", wide)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    assert "not a 2-D" in hostile_import(procs, tmp_path, "import_tiff", rgb)
    bad_ids = tmp_path / "ids.tif"
    tifffile.imwrite(bad_ids, np.ones((4, 4), np.uint32))
    (tmp_path / "ids.csv").write_text("id,class\n0,A\n")
    assert "out of range" in hostile_import(procs, tmp_path, "import_tiff", bad_ids)
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + os.urandom(64))
    assert "label TIFF" in hostile_import(procs, tmp_path, "import_tiff", garbage)
    report("hostile import", importer="import_tiff", case="5 files", survived=True)


def test_hostile_omezarr(tmp_path, procs):
    import zarr

    (tmp_path / "outside.csv").write_text("id\n1\n")

    def store(name, *, head=None, labels_name="cells", shape=(8, 8), dataset="0", props=None):
        path = tmp_path / name
        root = zarr.open_group(str(path), mode="w")
        if head is not None:
            root.attrs["napari_hemato"] = head
        group = root.create_group("labels")
        group.attrs["ome"] = {"labels": [labels_name]}
        sub = group.create_group("cells")
        sub.create_array("0", shape=shape, chunks=(8, 8), dtype="uint32", fill_value=1)
        sub.attrs["ome"] = {"multiscales": [{"axes": [{"name": "y"}, {"name": "x"}],
                                             "datasets": [{"path": dataset}]}],
                            "image-label": {"properties": props or []}}
        return path

    cases = {
        "table outside": (store("a.zarr", head={"table": "../outside.csv", "columns": ["id"]}),
                          "refusing the file name"),
        "absolute table": (store("b.zarr", head={"table": str(tmp_path / "outside.csv"),
                                                 "columns": ["id"], "label_name": "cells"}),
                           "refusing the file name"),
        "label name outside": (store("c.zarr", labels_name="../../x"), "refusing the file name"),
        "dataset outside": (store("d.zarr", dataset="../../../x"), "refusing the file name"),
        "terapixel labels": (store("e.zarr", shape=(10**6, 10**6)), "out of range"),
        "label value beyond uint32": (store("f.zarr", props=[{"label-value": 2**40}]), "out of range"),
        "label value text": (store("g.zarr", props=[{"label-value": "x"}]), "not an integer"),
    }
    for case, (path, expected) in cases.items():
        assert expected in hostile_import(procs, tmp_path, "import_omezarr", path), case
        report("hostile import", importer="import_omezarr", case=case, survived=True)
