"""Annotation sets: corrected (or raw) results on the image's own pixel grid.

An :class:`AnnotationSet` is what review edits and what every export format
writes and reads back: the object table (schema of :mod:`napari_hemato.core.table`)
plus, for instance tasks, a uint32 label image aligned with level 0 of the
image (``labels[0, 0]`` is level-0 pixel ``origin``). Results of a run live on
the model's work grid; :func:`from_result` maps them onto level 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from napari_hemato.core.geometry import work_index
from napari_hemato.core.tiling import Box


@dataclass
class AnnotationSet:
    """Objects of one image region, in level-0 pixel coordinates.

    Parameters
    ----------
    kind : {"instances", "points"}
    table : DataFrame
        One row per object; ``id`` matches the label value for instances.
    class_names : list of str
        All classes the objects may take (``prob_<name>`` columns).
    labels : (H, W) uint32 array, optional
        Instance labels over ``[origin, origin + shape)`` of level 0.
    origin : (int, int)
        Level-0 pixel of ``labels[0, 0]``.
    mpp : float, optional
        Level-0 µm/px of the image (None when unknown).
    image_path : str, optional
        The image these objects were found on.
    image_shape : (int, int), optional
        Level-0 (Y, X) of that image.
    metadata : dict
        Anything else worth carrying (model, run id, ...).
    """

    kind: str
    table: pd.DataFrame
    class_names: list[str]
    labels: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)
    mpp: float | None = None
    image_path: str | None = None
    image_shape: tuple[int, int] | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("instances", "points"):
            raise ValueError(f"kind must be 'instances' or 'points', not {self.kind!r}")
        if self.kind == "instances" and self.labels is not None:
            if self.labels.ndim != 2:
                raise ValueError(f"labels must be 2-D, got shape {self.labels.shape}")
            self.labels = np.asarray(self.labels, np.uint32)

    @property
    def box(self) -> Box | None:
        """Level-0 box covered by ``labels``."""
        if self.labels is None:
            return None
        y0, x0 = self.origin
        return (y0, x0, y0 + self.labels.shape[0], x0 + self.labels.shape[1])

    @property
    def region(self) -> Box | None:
        """The level-0 box that was analysed: recorded by the run (``metadata["region"]``),
        else the label image's box, else the whole image (None when nothing says)."""
        if self.metadata.get("region"):
            return tuple(int(v) for v in self.metadata["region"])
        if self.box is not None:
            return self.box
        if self.image_shape:
            return (0, 0, int(self.image_shape[0]), int(self.image_shape[1]))
        return None

    @property
    def region_mm2(self) -> float | None:
        """Area of :attr:`region` in mm² (None without a pixel size): rates are over it.

        Examples
        --------
        >>> a = AnnotationSet("points", pd.DataFrame(), [], mpp=0.5, image_shape=(10000, 10000),
        ...                   metadata={"region": [0, 0, 1000, 2000]})
        >>> a.region_mm2
        0.5
        """
        return region_area_mm2(self.region, self.mpp)


def region_area_mm2(region: Box | None, mpp: float | None) -> float | None:
    """Area of a level-0 box in mm² (None without a box or a pixel size)."""
    if region is None or not mpp:
        return None
    y0, x0, y1, x1 = region
    return max(y1 - y0, 0) * max(x1 - x0, 0) * float(mpp) ** 2 / 1e6


def upsample_labels(labels: np.ndarray, factor: float, shape: tuple[int, int],
                    start: tuple[int, int] = (0, 0), work_start: tuple[int, int] = (0, 0)
                    ) -> np.ndarray:
    """Nearest-neighbour map of work-grid ``labels`` onto a level-0 grid of ``shape``.

    The output's pixel ``(0, 0)`` is ROI-relative level-0 pixel ``start``; ``labels``
    begins at work pixel ``work_start``. Level-0 pixel ``p`` takes the work pixel
    :func:`~napari_hemato.core.geometry.work_index` gives it (the one whose footprint
    ``[i * factor, (i + 1) * factor)`` contains ``p + 0.5``), so any crop maps exactly
    as the whole region does, and as the table's level-0 ``area_px`` counts.
    """
    iy = work_index(start[0] + np.arange(shape[0]), factor) - work_start[0]
    ix = work_index(start[1] + np.arange(shape[1]), factor) - work_start[1]
    iy = np.clip(iy, 0, labels.shape[0] - 1)
    ix = np.clip(ix, 0, labels.shape[1] - 1)
    return np.asarray(labels[iy[:, None], ix[None, :]], np.uint32)


def from_result(result, *, roi: Box | None = None) -> AnnotationSet:
    """An engine :class:`~napari_hemato.core.engine.RunResult` as an annotation set.

    Labels are read from the work grid for ``roi`` (level-0 box; default the
    run's region) and mapped onto level-0 pixels. Keep ``roi`` modest for whole
    slides: the label image is held in memory.
    """
    grid = result.grid
    roi = tuple(roi or grid.roi)
    table = result.table()
    labels = None
    if result.spec.kind == "points":
        inside = (table["y"] >= roi[0] - 0.5) & (table["y"] < roi[2] - 0.5)
        inside &= (table["x"] >= roi[1] - 0.5) & (table["x"] < roi[3] - 0.5)
        table = table[inside].reset_index(drop=True)
    else:
        labels = level0_labels(result.labels(), grid, roi)
        present = np.unique(labels)
        table = table[table["id"].isin(present)].reset_index(drop=True)
    cfg = result.store.config
    return AnnotationSet(
        kind=result.spec.kind,
        table=table,
        class_names=list(cfg["model"].get("class_names", result.spec.class_names)),
        labels=labels,
        origin=(roi[0], roi[1]),
        mpp=cfg["slide"]["mpp"],
        image_path=cfg["slide"]["path"],
        image_shape=tuple(cfg["slide"]["shape"]),
        metadata={"model": cfg["model"], "result": str(result.path), **region_metadata(
            roi, None if grid.mpp_assumed else grid.mpp0)},
    )


def work_window(grid, roi: Box) -> Box:
    """The work-grid box ``(wy0, wx0, wy1, wx1)`` whose pixels the level-0 box ``roi``
    maps to (see :func:`~napari_hemato.core.geometry.work_index`)."""
    f = grid.factor
    ry, rx = grid.roi[:2]
    wy0, wx0 = int(work_index(roi[0] - ry, f)), int(work_index(roi[1] - rx, f))
    wy1 = min(int(work_index(roi[2] - ry - 1, f)) + 1, grid.shape[0])
    wx1 = min(int(work_index(roi[3] - rx - 1, f)) + 1, grid.shape[1])
    return (wy0, wx0, wy1, wx1)


def level0_labels(work_labels, grid, roi: Box, *, work=None) -> np.ndarray:
    """The level-0 label image of ``roi`` from the work-grid labels (a zarr array, or the
    already-read ``work`` window of :func:`work_window`)."""
    wy0, wx0, wy1, wx1 = work_window(grid, roi)
    if work is None:
        work = np.asarray(work_labels[wy0:wy1, wx0:wx1])
    ry, rx = grid.roi[:2]
    shape = (roi[2] - roi[0], roi[3] - roi[1])
    return upsample_labels(work, grid.factor, shape, (roi[0] - ry, roi[1] - rx), (wy0, wx0))


def region_metadata(region: Box, mpp: float | None) -> dict:
    """``{"region": [y0, x0, y1, x1], "region_mm2": area}``: what a run analysed, carried by
    its layers and annotation sets so that rates are over that area (not the whole slide)."""
    area = region_area_mm2(region, mpp)
    return {"region": [int(v) for v in region],
            **({"region_mm2": round(area, 6)} if area is not None else {})}
