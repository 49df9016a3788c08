"""Cell crops + CSV manifest: the training layout ``napari-hemato train wbc --data`` reads.

``folder/<class>/<slide>_<id>.png`` holds one square crop per object at the
image's native resolution (white outside the image), ``folder/manifest.csv``
one row per crop: ``path`` (relative to the folder), ``class``, ``id``,
``slide``, ``split`` (per slide, so crops of one slide never straddle
train / val), the crop box ``crop_*`` in level-0 pixels, then every column of
the object table. ``folder/hemato_export.json`` keeps per-slide details
(classes, pixel size, dtypes) so :func:`import_crops` restores the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export._atomic import ExportError, atomic_outputs, check_destination
from napari_hemato.core.export._common import (
    from_header,
    header,
    prob_columns,
    read_table_csv,
    restore_table,
    write_table_csv,
)

__all__ = ["crop_box", "export_crops", "import_crops", "slide_split"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
DETAILS = "hemato_export.json"
LEAD = ["path", "class", "id", "slide", "split"]
CROP = ["crop_y0", "crop_x0", "crop_y1", "crop_x1"]


def slide_split(slide: str, val_fraction: float = 0.15) -> str:
    """Deterministic ``"train"`` / ``"val"`` for a slide name (SHA-256 of the name).

    Examples
    --------
    >>> slide_split("smear_field_cbc") in ("train", "val")
    True
    """
    u = int(hashlib.sha256(slide.encode("utf-8")).hexdigest()[:12], 16) / 16**12
    return "val" if u < val_fraction else "train"


def crop_box(row: dict, *, context: float = 1.5, min_side: int = 32) -> tuple[int, int, int, int]:
    """Square level-0 box (y0, x0, y1, x1) around an object's bbox (or its point).

    Side = ``max(min_side, ceil(context * max(bbox h, bbox w)))``, centred on
    the bbox centre (the pixel centre for points without a bbox).

    Examples
    --------
    >>> crop_box({"bbox_y0": 10, "bbox_x0": 20, "bbox_y1": 50, "bbox_x1": 40, "y": 30, "x": 30})
    (0, 0, 60, 60)
    """
    box = [row.get(k) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")]
    if all(v is not None and np.isfinite(v) for v in box):
        cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        extent = max(box[2] - box[0], box[3] - box[1])
    else:
        cy, cx, extent = float(row["y"]) + 0.5, float(row["x"]) + 0.5, 0
    side = max(int(min_side), math.ceil(context * extent))
    y0, x0 = math.floor(cy - side / 2), math.floor(cx - side / 2)
    return y0, x0, y0 + side, x0 + side


def _folder_name(cls) -> str:
    if cls is None or (isinstance(cls, float) and math.isnan(cls)) or str(cls) == "":
        return "unassigned"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(cls)).strip(".") or "class"


def _write_crops(ann, folder: Path, slide: str, split, size, context, min_side) -> pd.DataFrame:
    from PIL import Image

    from napari_hemato.core.slide import open_slide, to_rgb8

    if not ann.image_path:
        raise ExportError("cannot export crops: the annotations name no image_path")
    table = ann.table
    if not {"id", "class"} <= set(table.columns):
        raise ExportError(f"cannot export crops of {slide}: the table needs id and class columns")
    if table["id"].duplicated().any():
        raise ExportError(f"cannot export crops: duplicate ids in the table of {slide}")
    rows = table.to_dict("records")
    records = []
    with open_slide(ann.image_path) as image:
        for row in rows:
            y0, x0, y1, x1 = crop_box(row, context=context, min_side=min_side)
            rgb = to_rgb8(image.read_region(0, y0, x0, y1, x1, fill=255))
            if size is not None:
                rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
            rel = f"{_folder_name(row.get('class'))}/{slide}_{int(row['id'])}.png"
            (folder / rel).parent.mkdir(exist_ok=True)
            Image.fromarray(rgb).save(folder / rel, format="PNG")
            records.append({"path": rel, "slide": slide, "split": split,
                            **dict(zip(CROP, (y0, x0, y1, x1), strict=True))})
    lead = pd.DataFrame(records, columns=["path", "slide", "split", *CROP])
    body = table.reset_index(drop=True)
    probs = prob_columns(body)
    geometry = [c for c in ("y", "x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1") if c in body]
    mid = [c for c in ("confidence", "score", "provenance", "reviewed") if c in body]
    rest = [c for c in body.columns if c not in {"class", "id", *geometry, *mid, *probs}]
    out = pd.concat([lead, body], axis=1)
    return out[[*LEAD, *geometry, *CROP, *mid, *probs, *rest]]


def export_crops(annotations: AnnotationSet, folder: str | os.PathLike, *, size: int | None = None,
                 context: float = 1.5, min_side: int = 32, split: str | dict | None = None,
                 val_fraction: float = 0.15, append: bool = False, overwrite: bool = False,
                 base_dir: str | os.PathLike | None = None) -> Path:
    """Write one PNG crop per object and a ``manifest.csv`` for training.

    Parameters
    ----------
    annotations : AnnotationSet
        Objects with bboxes (instances) or positions (points); pixels are read
        from ``annotations.image_path`` at level 0.
    folder : path
        Output folder (``<class>/<slide>_<id>.png`` + ``manifest.csv``).
    size : int, optional
        Resize every crop to ``size`` x ``size``; default keeps native pixels.
    context : float
        Crop side as a multiple of the larger bbox side.
    min_side : int
        Smallest crop side in pixels.
    split : str or dict, optional
        Split name for all rows, or ``{slide: split}``; default a hash of the
        slide name (about ``val_fraction`` of slides go to ``"val"``).
    val_fraction : float
        Share of slides the default split sends to validation.
    append : bool
        Add this slide to an existing crops folder (its manifest is extended;
        with ``overwrite=True`` earlier crops of the same slide are replaced).
    overwrite : bool
        Replace an existing folder (or, with ``append``, the slide's crops).
    base_dir : path, optional
        Refuse destinations resolving outside this folder.

    Returns
    -------
    Path
        The folder written.

    Examples
    --------
    >>> export_crops(wbc, "wbc_crops")  # doctest: +SKIP
    >>> pd.read_csv("wbc_crops/manifest.csv")[["path", "class", "split"]].head()  # doctest: +SKIP
    """
    ann = annotations
    slide = Path(ann.image_path or "image").stem
    chosen = split.get(slide) if isinstance(split, dict) else split
    chosen = chosen or slide_split(slide, val_fraction)
    details = {"slides": {slide: header(ann)}}
    if append:
        dest = check_destination(folder, overwrite=True, base_dir=base_dir)
        if (dest / MANIFEST).is_file():
            return _append(ann, dest, slide, chosen, details, size, context, min_side, overwrite)
    dest = check_destination(folder, overwrite=overwrite, base_dir=base_dir)
    with atomic_outputs([dest], overwrite=overwrite, folders=True) as (tmp,):
        manifest = _write_crops(ann, tmp, slide, chosen, size, context, min_side)
        write_table_csv(manifest, tmp / MANIFEST)
        (tmp / DETAILS).write_text(json.dumps(details, indent=1))
    log.info("exported %d crops of %s to %s (split %s)", len(manifest), slide, dest, chosen)
    return dest


def _append(ann, dest: Path, slide, chosen, details, size, context, min_side, overwrite) -> Path:
    old = read_manifest(dest)  # its paths are deleted below: they must stay inside dest
    known = json.loads((dest / DETAILS).read_text()) if (dest / DETAILS).exists() else {}
    if (old["slide"].astype(str) == slide).any() and not overwrite:
        raise ExportError(f"{dest} already holds crops of {slide} (pass overwrite=True to replace)")
    try:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".crops-") as scratch:
            manifest = _write_crops(ann, Path(scratch), slide, chosen, size, context, min_side)
            for rel in old.loc[old["slide"].astype(str) == slide, "path"]:
                (dest / rel).unlink(missing_ok=True)
            for rel in manifest["path"]:  # each crop lands whole; the manifest comes last
                (dest / rel).parent.mkdir(exist_ok=True)
                os.replace(Path(scratch) / rel, dest / rel)
    except OSError as exc:
        raise ExportError(f"cannot write crops to {dest}: {exc}") from exc
    merged = pd.concat([old[old["slide"].astype(str) != slide], manifest], ignore_index=True)
    known.setdefault("slides", {}).update(details["slides"])
    with atomic_outputs([dest / MANIFEST, dest / DETAILS], overwrite=True) as (m, d):
        write_table_csv(merged, m)
        d.write_text(json.dumps(known, indent=1))
    log.info("appended %d crops of %s to %s", len(manifest), slide, dest)
    return dest


def import_crops(folder: str | os.PathLike, *, slide: str | None = None) -> AnnotationSet:
    """Read a crops manifest back as a points-like :class:`AnnotationSet` (no labels).

    Parameters
    ----------
    folder : path
        A folder written by :func:`export_crops`.
    slide : str, optional
        Which slide's rows (needed when the folder holds several).

    Returns
    -------
    AnnotationSet
        ``kind="points"``; ``metadata`` holds ``crops`` (paths), ``split`` and
        ``crop_boxes``.

    Examples
    --------
    >>> ann = import_crops("wbc_crops")  # doctest: +SKIP
    >>> ann.table["class"].value_counts()  # doctest: +SKIP
    """
    from napari_hemato.core.export import _atomic as g

    return g.read_guarded(Path(folder) / MANIFEST, "crops manifest", _read_crops, slide=slide)


def read_manifest(folder: Path) -> pd.DataFrame:
    """The manifest of a crops folder, refusing crop paths that leave the folder."""
    from napari_hemato.core.export import _atomic as g

    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder}: no {MANIFEST} (not a crops folder)")
    manifest = read_table_csv(folder / MANIFEST)
    if "path" not in manifest:
        raise ExportError(f"{folder / MANIFEST}: no path column")
    for rel in manifest["path"]:
        g.inside(folder, rel, folder / MANIFEST)
    return manifest


def _read_crops(manifest_path: Path, *, slide) -> AnnotationSet:
    from napari_hemato.core.export import _atomic as g

    folder = manifest_path.parent
    manifest = read_manifest(folder)
    slides = sorted(set(manifest["slide"].astype(str))) if "slide" in manifest else []
    if slide is None and len(slides) > 1:
        raise ExportError(f"{folder} holds crops of {len(slides)} slides; pick one: {slides}")
    slide = slide or (slides[0] if slides else None)
    if slide is not None and "slide" in manifest:
        manifest = manifest[manifest["slide"].astype(str) == slide].reset_index(drop=True)
    details = {}
    if (folder / DETAILS).is_file():
        details = json.loads(g.check_file_size(folder / DETAILS).read_text()).get("slides", {}).get(slide, {})
    drop = {"path", "slide", "split", *CROP}
    columns = details.get("columns") or [c for c in manifest.columns if c not in drop]
    table = restore_table(manifest, columns, details.get("dtypes"))
    head = {**details, "kind": "points", "shape": None}
    head.setdefault("class_names", [c[len("prob_"):] for c in prob_columns(table)])
    head["metadata"] = {**details.get("metadata", {}), "crops": manifest["path"].tolist(),
                        "split": sorted(set(manifest.get("split", pd.Series(dtype=str)).astype(str))),
                        "crop_boxes": manifest[CROP].to_numpy().tolist() if set(CROP) <= set(manifest) else None}
    return from_header(head, table, None)
