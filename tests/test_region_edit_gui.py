"""Issue 12 item 4 in a real viewer: Edit here on a lazy whole-slide Labels layer, paint and
delete in the window, Save into slide; the store, the layer, the autosave and a reopen agree."""

from __future__ import annotations

import numpy as np
import pytest

from .test_widgets import field, read_every_tile, run_analysis, two_class_model  # noqa: F401

pytest.importorskip("onnx")
pytestmark = pytest.mark.gui


@pytest.mark.parametrize("pyramid", [False, True], ids=["one-level", "multiscale"])
def test_edit_here_paint_delete_save_reopen(make_napari_viewer, qtbot, field,  # noqa: F811
                                            two_class_model, monkeypatch, pyramid):  # noqa: F811
    import zarr

    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.core import label_pyramid
    from napari_hemato.core.annotations import from_result
    from napari_hemato.core.engine import open_result
    from napari_hemato.core.sidecar import saved_sets
    from napari_hemato.io import viewer as glue

    from .test_object_geometry import assert_table_is_the_label_image

    monkeypatch.setattr(glue, "MAX_EDITABLE_PIXELS", 1000)  # the 400 x 520 field stays lazy
    if pyramid:  # levels of 520, 260, 130 and 65 px, as a whole slide's would be
        monkeypatch.setattr(label_pyramid, "TOP_SIDE", 100)
    viewer = make_napari_viewer(show=True)
    viewer.open(field, plugin="napari-hemato")
    run_analysis(qtbot, AnalyzeWidget(viewer), task="nuclei", model=two_class_model)
    slide = viewer.layers[-1]
    assert not slide.editable
    if pyramid:
        assert slide.multiscale and len(slide.data) == 4
        assert all(isinstance(level, zarr.Array) for level in slide.data)
    else:
        assert isinstance(slide.data, zarr.Array)
    review = ReviewWidget(viewer)
    review.bind_layer(slide)
    assert review.edit_here_button.isEnabled() and not review.save_window_button.isEnabled()
    # look at the middle of the field, about 150 x 200 px of it
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (200 * 0.5, 260 * 0.5)
    camera.zoom = min(viewer.canvas.size[0] / (150 * 0.5), viewer.canvas.size[1] / (200 * 0.5))
    window = review.edit_here()
    assert window is not None and window.editable and isinstance(window.data, np.ndarray)
    assert review.save_window_button.isEnabled() and not review.edit_here_button.isEnabled()
    edit = window.metadata["napari_hemato"]["edit"]
    y0, x0, y1, x1 = edit["box"]
    assert (y1 - y0) * (x1 - x0) < 400 * 520  # the view, not the whole field
    # the window lies exactly over the slide layer: a pixel's world position is the same
    oy, ox = window.data.shape[0] // 2, window.data.shape[1] // 2
    world = window.data_to_world((oy, ox))
    assert glue.world_to_level0(slide, *world) == pytest.approx((y0 + oy, x0 + ox))

    inside = [i for i in window.features["id"] if i not in edit["locked"]]
    victim, painted_over = int(inside[0]), int(inside[1])
    review.select(victim, center=False)
    review.delete()
    # paint a new object with napari's brush in an empty spot
    free = np.argwhere(window.data == 0)
    py, px = free[len(free) // 2]
    new_label = int(window.data.max()) + 1
    window.brush_size = 5
    window.paint((py, px), new_label)
    assert (window.data == new_label).sum() > 5
    # the paint event syncs the table (once napari has written the pixels)
    qtbot.waitUntil(lambda: new_label in review.session.table.index, timeout=10_000)
    review.session.set_class([painted_over], "B")
    # napari's fill (one call, its event comes before the pixels): object `filled` becomes `into`
    filled, into = int(inside[2]), int(inside[3])
    fy, fx = np.argwhere(window.data == filled)[0]
    window.fill((fy, fx), into)
    qtbot.waitUntil(lambda: filled not in review.session.table.index, timeout=10_000)

    summary = review.save_window()
    assert summary is not None and summary["removed"] == 2 and summary["added"] == 1
    assert window not in viewer.layers and review.layer is slide or review.layer == slide
    result = open_result(slide.metadata["napari_hemato"]["result"])
    stored = from_result(result).labels
    assert victim not in np.unique(stored) and filled not in np.unique(stored)
    features = slide.features.set_index("id")
    assert features.loc[painted_over, "class"] == "B" and victim not in features.index
    assert_table_is_the_label_image(slide.features.drop(columns="index"), stored, result.grid.roi)
    # every lower level was brought up to date over the saved box: each keeps every 2nd pixel
    levels = label_pyramid.levels(result.store.group)
    assert len(levels) == (4 if pyramid else 1)
    for upper, lower in zip(levels, levels[1:], strict=False):
        np.testing.assert_array_equal(np.asarray(lower), np.asarray(upper)[::2, ::2])
    # the slide's table is saved now; the window's own autosave is gone
    names = saved_sets(field)
    assert not any("edit" in n for n in names)
    [(data, kwargs, kind)] = glue.restore_saved_layers(field)
    restored = kwargs["features"].set_index("id")
    assert kind == "labels" and victim not in restored.index
    assert restored.loc[painted_over, "class"] == "B"
    assert len(restored) == len(features)
