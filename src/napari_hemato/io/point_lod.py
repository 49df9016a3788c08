"""Level of detail for big Points layers in a viewer (napari objects, no Qt).

:func:`install` watches a viewer: every napari-hemato Points layer with more than
``budget`` points gets a :class:`PointsLOD`, which sets the layer's ``shown`` from
:func:`napari_hemato.core.point_lod.plan` whenever the camera leaves the last plan
(:func:`~napari_hemato.core.point_lod.still_covers`), and after points are added, moved or
deleted. The layer's data and features stay whole: review, export and autosave see every
point; only drawing is thinned. Selected points are always drawn. While a layer is thinned,
the viewer's text overlay says how many points are drawn.

:func:`prepare` plans a layer before it is added (so ``add_layer`` never uploads a million
points to the GPU); the widgets and ``analyze --view`` call it.
"""

from __future__ import annotations

import weakref

import numpy as np

from napari_hemato.core.point_lod import DEFAULT_BUDGET, Plan, plan, point_ranks, still_covers
from napari_hemato.io.layers import KEY
from napari_hemato.io.napari_fixes import respect_points_shown
from napari_hemato.io.viewer import camera_world_box, viewer_camera

_LODS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> PointsLOD
_VIEWERS: weakref.WeakSet = weakref.WeakSet()
_NOTE_PREFIX = "napari-hemato: "


def wants_lod(layer, budget: int = DEFAULT_BUDGET) -> bool:
    """A napari-hemato Points layer with more points than ``budget``."""
    return (getattr(layer, "_type_string", "") == "points" and KEY in layer.metadata
            and len(layer.data) > budget)


class PointsLOD:
    """Keeps one Points layer's ``shown`` matched to the viewer's camera."""

    def __init__(self, viewer, layer, *, budget: int = DEFAULT_BUDGET):
        self.viewer, self.layer, self.budget = viewer, layer, budget
        self.last: Plan | None = None
        self.n_plans = 0
        self._ranks = None
        layer.events.data.connect(self._on_data)
        self.camera = viewer_camera(viewer)
        self.camera.events.center.connect(self._on_camera)
        self.camera.events.zoom.connect(self._on_camera)

    def view_box(self) -> np.ndarray:
        """The camera's view in the layer's data coordinates."""
        data = np.array([self.layer.world_to_data(p)[-2:] for p in camera_world_box(self.viewer)])
        return np.sort(data, axis=0)

    def ranks(self) -> np.ndarray:
        if self._ranks is None or len(self._ranks) != len(self.layer.data):
            f = self.layer.features
            ids = f["id"].to_numpy(float) if "id" in f else np.arange(len(self.layer.data), dtype=float)
            self._ranks = point_ranks(ids, f["provenance"].to_numpy() if "provenance" in f else None)
        return self._ranks

    def update(self, *, force: bool = False) -> bool:
        """Re-plan when the view needs it (or ``force``); True when ``shown`` was set."""
        view = self.view_box()
        if not force and still_covers(self.last, view):
            return False
        data = np.asarray(self.layer.data, float)[:, -2:]
        self.last = plan(data, self.ranks(), view, budget=self.budget)
        shown = self.last.shown.copy()
        selected = [i for i in self.layer.selected_data if i < len(shown)]
        shown[selected] = True
        self.layer.shown = shown
        self.n_plans += 1
        _note(self.viewer)
        return True

    def _on_camera(self, event=None) -> None:
        if self.layer in self.viewer.layers and self.layer.visible:
            self.update()

    def _on_data(self, event=None) -> None:
        if str(getattr(event, "action", "changed")) in ("adding", "removing", "changing"):
            return  # napari 0.5+: act once the change is done
        self._ranks = None
        self.update(force=True)

    def close(self) -> None:
        self.layer.events.data.disconnect(self._on_data)
        self.camera.events.center.disconnect(self._on_camera)
        self.camera.events.zoom.disconnect(self._on_camera)
        self.layer.shown = True


def lod_of(layer) -> PointsLOD | None:
    return _LODS.get(layer)


def prepare(viewer, layer, *, budget: int = DEFAULT_BUDGET) -> PointsLOD | None:
    """Attach a level of detail to ``layer`` (before or after it is added) if it needs one."""
    if not wants_lod(layer, budget) or layer in _LODS:
        return _LODS.get(layer)
    respect_points_shown()
    lod = _LODS[layer] = PointsLOD(viewer, layer, budget=budget)
    lod.update(force=True)
    return lod


def install(viewer, *, budget: int = DEFAULT_BUDGET) -> None:
    """Give every big napari-hemato Points layer of ``viewer``, now and later, a level of
    detail; idempotent."""
    if viewer in _VIEWERS:
        return
    _VIEWERS.add(viewer)
    for layer in list(viewer.layers):
        prepare(viewer, layer, budget=budget)

    def on_inserted(event):
        prepare(viewer, event.value, budget=budget)
        _note(viewer)

    def on_removed(event):
        lod = _LODS.pop(event.value, None)
        if lod is not None:
            lod.close()
        _note(viewer)

    viewer.layers.events.inserted.connect(on_inserted)
    viewer.layers.events.removed.connect(on_removed)


def text_overlay(viewer):
    """The canvas text overlay (``viewer.canvas.overlays.text`` from napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return overlays.text if overlays is not None and hasattr(overlays, "text") else viewer.text_overlay


def _note(viewer) -> None:
    """Say on the canvas which layers are thinned (and clear what we said when none is)."""
    thinned = [lod for lod in list(_LODS.values())
               if lod.viewer is viewer and lod.last is not None and lod.last.fraction < 1.0
               and lod.layer in viewer.layers]
    overlay = text_overlay(viewer)
    if thinned:
        lines = [f"{lod.layer.name}: {int(lod.layer.shown.sum()):,} of {len(lod.layer.data):,} "
                 "points drawn; zoom in to see all" for lod in thinned]
        overlay.text = _NOTE_PREFIX + "\n".join(lines)
        overlay.visible = True
    elif str(overlay.text).startswith(_NOTE_PREFIX):
        overlay.text = ""
        overlay.visible = False


def thin_on_open(layer_data: list, *, budget: int = DEFAULT_BUDGET) -> list:
    """For a reader: big Points layers start thinned (``shown``) and the current viewer gets
    :func:`install`, which re-plans each at insertion. Without a viewer nothing changes."""
    big = [kw for _data, kw, kind in layer_data
           if kind == "points" and KEY in kw.get("metadata", {}) and len(_data) > budget]
    if not big:
        return layer_data
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no Qt app, no viewer: leave the layers whole
        viewer = None
    if viewer is None:
        return layer_data
    install(viewer, budget=budget)
    for kw in big:
        f = kw.get("features")
        n = len(f)
        ids = f["id"].to_numpy(float) if f is not None and "id" in f else np.arange(n, dtype=float)
        prov = f["provenance"].to_numpy() if f is not None and "provenance" in f else None
        kw["shown"] = point_ranks(ids, prov) < budget / n
    return layer_data
