"""Autosave of corrections in a sidecar folder next to the image.

``<image>.hemato/<name>/`` holds one annotation set: ``objects.csv`` (the
corrected table), ``labels.npz`` (the label image, instances only) and
``meta.json`` (kind, classes, origin, µm/px, image). Each save builds the new
version in a temporary folder and swaps it in, so a crash mid-save leaves the
previous version intact. When the image's folder is read-only, or inside the
installed package (its bundled samples), the sidecar goes to the user's cache
(``~/.cache/napari-hemato/sidecars/<hash>``) instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.table import read_table_csv

log = logging.getLogger(__name__)
#: the installed package: nothing is ever written inside it (its samples' sidecars go to the cache)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def sidecar_dir(image_path: str | Path, *, create: bool = False) -> Path:
    """The sidecar folder of an image (next to it when writable, else in the cache)."""
    image_path = Path(image_path).resolve()
    beside = image_path.with_name(image_path.name + ".hemato")
    cache = _cache_dir(image_path)
    in_package = image_path.is_relative_to(PACKAGE_DIR)
    for existing in (cache,) if in_package else (beside, cache):
        if existing.is_dir():
            return existing
    target = beside if os.access(image_path.parent, os.W_OK) and not in_package else cache
    if create:
        target.mkdir(parents=True, exist_ok=True)
        if target == cache:
            (cache / "image_path.txt").write_text(str(image_path))
    return target


def _cache_dir(image_path: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha1(str(image_path).encode()).hexdigest()[:16]
    return root / "napari-hemato" / "sidecars" / digest


def save_annotations(ann: AnnotationSet, folder: str | Path) -> Path:
    """Atomically (re)write one annotation set into ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        ann.table.to_csv(tmp / "objects.csv", index=False)
        if ann.labels is not None:
            np.savez_compressed(tmp / "labels.npz", labels=np.asarray(ann.labels, np.uint32))
        meta = {
            "kind": ann.kind, "class_names": list(ann.class_names), "origin": list(ann.origin),
            "mpp": ann.mpp, "image_path": ann.image_path,
            "image_shape": list(ann.image_shape) if ann.image_shape else None,
            "metadata": ann.metadata,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_annotations(folder: str | Path) -> AnnotationSet:
    """Read an annotation set written by :func:`save_annotations`."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    table = read_table_csv(folder / "objects.csv")
    labels = None
    if (folder / "labels.npz").exists():
        with np.load(folder / "labels.npz", allow_pickle=False) as data:
            labels = data["labels"]
    return AnnotationSet(
        kind=meta["kind"], table=table, class_names=meta["class_names"], labels=labels,
        origin=tuple(meta["origin"]), mpp=meta["mpp"], image_path=meta["image_path"],
        image_shape=tuple(meta["image_shape"]) if meta["image_shape"] else None,
        metadata=meta.get("metadata") or {},
    )


def saved_sets(image_path: str | Path) -> dict[str, Path]:
    """Name -> folder of every annotation set saved for an image."""
    folder = sidecar_dir(image_path)
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").exists()}


def autosave(ann: AnnotationSet, name: str) -> Path | None:
    """Save ``ann`` as the set ``name`` beside its image; None when it cannot be placed.

    The one autosave of the plugin: the Analyse widget saves new results with it and
    the Review widget every batch of corrections. Sets without an existing image are
    skipped; a lazy whole-slide set (``metadata["lazy"]``) saves its table only, its
    labels stay in the run's store (``metadata["result"]``).
    """
    if not ann.image_path or not Path(ann.image_path).exists():
        return None
    if ann.kind == "instances" and ann.labels is None and not ann.metadata.get("lazy"):
        return None
    return save_annotations(ann, sidecar_dir(ann.image_path, create=True) / name)
