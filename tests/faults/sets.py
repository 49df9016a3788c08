"""Annotation sets for the autosave faults, importable by the forked child processes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_hemato.core.annotations import AnnotationSet


def version(v: int, *, shape=(384, 384), n=200) -> AnnotationSet:
    """Version ``v`` of one set: every label value and every row say ``v`` (checkable whole).

    Big enough (random labels compress badly) that a save takes a while to write.
    """
    rng = np.random.default_rng(v)
    labels = rng.integers(1, n + 1, shape, dtype=np.uint32)
    labels[0, 0] = v + 1
    table = pd.DataFrame({"id": np.arange(1, n + 1), "y": rng.uniform(0, shape[0], n),
                          "x": rng.uniform(0, shape[1], n), "class": "A", "version": v})
    return AnnotationSet("instances", table, ["A", "B"], labels=labels, mpp=0.5,
                         image_path="field.tif", image_shape=shape)


def check(ann: AnnotationSet) -> int:
    """The version of a loaded set, asserting it is whole (table and labels of one version)."""
    v = int(ann.table["version"].iloc[0])
    assert (ann.table["version"] == v).all()
    expected = version(v)
    np.testing.assert_array_equal(ann.labels, expected.labels)
    return v
