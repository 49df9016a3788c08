"""Where the reviewer looks: the object framed at a review scale, boxed, and its CAM.

Functions of the Review dock that move the camera and draw (no review state).
"""

from __future__ import annotations

import logging

import numpy as np

from napari_hemato.io.layers import KEY
from napari_hemato.tasks import task_for

log = logging.getLogger(__name__)
#: Next / Prev frame an object in a window this many times its size (at least REVIEW_MIN_UM)
REVIEW_CONTEXT, REVIEW_MIN_UM = 4.0, 60.0


def layer_uid(layer):
    """A layer's identity across napari's proxies (``unique_id``, napari >= 0.5)."""
    return None if layer is None else getattr(layer, "unique_id", None) or id(layer)


def frame_object(viewer, layer, row, *, mpp, zoom: bool, highlight=None):
    """Centre ``viewer`` on ``row``'s object; with ``zoom``, at a review scale, boxed.

    Returns the highlight Shapes layer (``highlight`` reused when still in the viewer).
    """
    from napari_hemato.io.viewer import level0_to_world, review_box, viewer_camera

    camera = viewer_camera(viewer)
    box0 = review_box(row, mpp=mpp, context=REVIEW_CONTEXT, min_um=REVIEW_MIN_UM)
    (wy0, wx0), (wy1, wx1) = (level0_to_world(layer, *box0[:2]), level0_to_world(layer, *box0[2:]))
    camera.center = level0_to_world(layer, float(row["y"]), float(row["x"]))
    if not zoom:
        return highlight
    canvas = getattr(getattr(viewer, "canvas", None), "size", None) or (600, 800)
    camera.zoom = 0.9 * min(canvas[0] / max(wy1 - wy0, 1e-9), canvas[1] / max(wx1 - wx0, 1e-9))
    return show_highlight(viewer, layer, [[wy0, wx0], [wy1, wx1]], highlight)


def show_highlight(viewer, layer, corners, highlight=None):
    """A box around the object under review (one Shapes layer, reused)."""
    (y0, x0), (y1, x1) = corners
    oy, ox = (y1 - y0) / 2.5 / REVIEW_CONTEXT, (x1 - x0) / 2.5 / REVIEW_CONTEXT
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    rect = np.array([[cy - oy, cx - ox], [cy + oy, cx + ox]])
    active = viewer.layers.selection.active
    if highlight is None or layer_uid(highlight) not in {layer_uid(lyr) for lyr in viewer.layers}:
        highlight = viewer.add_shapes(
            [rect], shape_type="rectangle", edge_color="yellow", face_color="transparent",
            edge_width=max(2 * oy, 2 * ox) / 25, name="review: selected",
            units=tuple(str(u) for u in layer.units)[-2:],  # the reviewed layer's world
            metadata={KEY: {"role": "highlight"}})
    else:
        highlight.data = [rect]
        highlight.shape_type = ["rectangle"]
    highlight.edge_width = [max(2 * oy, 2 * ox) / 25]
    if active is not None and layer_uid(active) != layer_uid(highlight):
        viewer.layers.selection.active = active  # painting stays on the reviewed layer
    return highlight


def show_cam(widget, row) -> None:
    """Show in ``widget.cam`` where the classifier looked for ``row`` (when the task has a CAM)."""
    widget.cam.clear()
    widget.cam_caption.setVisible(False)
    task = task_for(widget.session.annotations)
    if not task.has_cam(row):
        return
    try:
        crop, cam = task.cam(widget.session.annotations, row)
    except Exception as err:  # noqa: BLE001 - the CAM is an aid; never break review
        log.info("no CAM for object %s: %s", row["id"], err)
        return
    from napari_hemato._widgets.prob_bars import heatmap_pixmap

    widget.cam.setPixmap(heatmap_pixmap(crop, cam))
    called = row["class_auto"] if "class_auto" in row else row["class"]
    widget.cam_caption.setText(f"The crop the classifier saw; red marks where it looked to "
                               f"call it {called} (class activation map)")
    widget.cam_caption.setVisible(True)
