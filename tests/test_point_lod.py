"""Level of detail for big Points layers: which points are drawn for a view (core), and a
real viewer drawing only those while the layer keeps every point (napari)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemato.core.point_lod import plan, point_ranks, still_covers


def uniform(n, side=10_000.0, seed=0):
    return np.random.default_rng(seed).uniform(0, side, (n, 2))


def test_plan_draws_every_point_in_view_when_few_and_a_thinning_within_budget_else():
    yx = uniform(200_000)
    ranks = point_ranks(np.arange(1, len(yx) + 1))
    zoomed = plan(yx, ranks, ((4000, 4000), (4500, 4500)), budget=5000, margin=0.5)
    inside = np.all((yx >= zoomed.box[0]) & (yx <= zoomed.box[1]), axis=1)
    assert zoomed.fraction == 1.0 and np.array_equal(zoomed.shown, inside)
    whole = plan(yx, ranks, ((0, 0), (10_000, 10_000)), budget=5000, margin=0.5)
    assert whole.fraction < 1.0 and whole.n_in_box == len(yx)
    assert abs(int(whole.shown.sum()) - 5000) < 100  # the Weyl ranks hit the budget closely
    # evenly spread: every tenth of the slide gets about a tenth of the drawn points
    per_strip = np.bincount((yx[whole.shown, 0] // 1000).astype(int), minlength=10)
    assert per_strip.min() > 0.8 * 500 and per_strip.max() < 1.2 * 500


def test_zooming_in_only_adds_points_and_touched_points_are_always_drawn():
    yx = uniform(100_000, seed=1)
    ids = np.arange(1, len(yx) + 1)
    provenance = np.array(["auto"] * len(yx), object)
    provenance[[7, 70_000]] = ["corrected", "manual"]
    ranks = point_ranks(ids, provenance)
    wide = plan(yx, ranks, ((0, 0), (10_000, 10_000)), budget=2000, margin=0.0)
    narrow = plan(yx, ranks, ((2000, 2000), (6000, 6000)), budget=2000, margin=0.0)
    in_narrow = np.all((yx >= 2000) & (yx <= 6000), axis=1)
    assert narrow.fraction > wide.fraction
    assert not np.any(wide.shown & in_narrow & ~narrow.shown)  # nothing drawn disappears
    assert wide.shown[7] and wide.shown[70_000]


def test_a_pan_inside_the_margin_keeps_the_plan_and_a_zoom_or_a_far_pan_does_not():
    yx = uniform(50_000, seed=2)
    ranks = point_ranks(np.arange(len(yx)))
    last = plan(yx, ranks, ((4000, 4000), (5000, 5000)), budget=1000, margin=0.5)
    assert last.fraction < 1.0
    assert still_covers(last, ((4200, 4300), (5200, 5300)))  # a pan of a fifth of the view
    assert not still_covers(last, ((6000, 6000), (7000, 7000)))  # out of the box
    assert not still_covers(last, ((4400, 4400), (4600, 4600)))  # zoomed in 5x: more to show
    assert not still_covers(None, ((0, 0), (1, 1)))


@pytest.mark.gui
def test_napari_draws_only_the_planned_points_and_the_review_edits_rows_in_place(
        make_napari_viewer, qtbot):
    from napari.layers import Layer

    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.core.annotations import AnnotationSet
    from napari_hemato.core.point_lod import DEFAULT_BUDGET
    from napari_hemato.io import point_lod
    from napari_hemato.io.layers import annotation_layer_data
    from napari_hemato.io.viewer import viewer_camera

    n = DEFAULT_BUDGET + 15_000
    yx = uniform(n, side=40_000.0, seed=3)
    p = np.random.default_rng(3).uniform(0, 1, n)
    table = pd.DataFrame({"id": np.arange(1, n + 1), "y": yx[:, 0], "x": yx[:, 1],
                          "class": np.where(p >= 0.5, "normal", "atypical"),
                          "confidence": np.maximum(p, 1 - p), "prob_normal": p,
                          "prob_atypical": 1 - p, "provenance": "auto", "reviewed": False})
    ann = AnnotationSet("points", table, ["normal", "atypical"], mpp=0.25)
    viewer = make_napari_viewer()
    point_lod.install(viewer)
    layer = Layer.create(*annotation_layer_data(ann, name="mitoses"))
    viewer.add_layer(layer)  # the inserted hook plans it
    viewer.reset_view()
    lod = point_lod.lod_of(layer)
    assert lod is not None and len(layer.data) == n and len(layer.features) == n
    drawn = layer._view_indices  # what napari slices, uploads and draws
    assert 0 < len(drawn) <= DEFAULT_BUDGET * 1.02
    assert np.array_equal(np.sort(drawn), np.flatnonzero(layer.shown))
    assert f"of {n:,} points drawn" in point_lod.text_overlay(viewer).text

    # zoom onto 1 mm²: every point in view is drawn, and the note goes away
    camera = viewer_camera(viewer)
    camera.center = (2500.0, 2500.0)  # world µm
    camera.zoom = camera.zoom * 20
    box = lod.view_box()
    in_view = np.flatnonzero(np.all((layer.data >= box[0]) & (layer.data <= box[1]), axis=1))
    assert len(in_view) > 0 and set(in_view) <= set(layer._view_indices.tolist())
    assert not point_lod.text_overlay(viewer).visible

    # a class change through the Review dock writes that row only, features and colour
    review = ReviewWidget(viewer)
    review.bind_layer(layer)
    k = int(in_view[0])
    obj = int(layer.features["id"].iloc[k])
    before_colors = layer.face_color.copy()
    review.select(obj, center=False)
    new = "atypical" if layer.features["class"].iloc[k] == "normal" else "normal"
    review.set_class(new)
    assert layer.features["class"].iloc[k] == new
    assert layer.features["provenance"].iloc[k] == "corrected"
    assert "class_auto" in layer.features
    changed = np.flatnonzero(np.any(layer.face_color != before_colors, axis=1))
    assert changed.tolist() == [k]
    assert review.session.class_counts()[new] == int((layer.features["class"] == new).sum())
    review.undo()
    assert np.array_equal(layer.face_color, before_colors)

    viewer.layers.remove(layer)
    assert point_lod.lod_of(layer) is None and not point_lod.text_overlay(viewer).visible


@pytest.mark.gui
def test_the_napari_fix_makes_2d_points_honour_shown(make_napari_viewer):
    from napari_hemato.io.napari_fixes import respect_points_shown

    assert respect_points_shown()
    viewer = make_napari_viewer()
    shown = np.zeros(10, bool)
    shown[[1, 4]] = True
    layer = viewer.add_points(uniform(10, side=100.0), shown=shown)
    assert layer._view_indices.tolist() == [1, 4]
    layer.shown = True
    assert len(layer._view_indices) == 10
