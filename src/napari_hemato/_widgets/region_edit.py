"""The Review dock's "Edit here" and "Save into slide" (logic in :mod:`napari_hemato.core.region_edit`).

Edit here cuts the view out of a whole-slide Labels layer (which stays lazy and
read-only) as an in-memory layer placed over it: napari's paint, erase and fill,
and the dock's merge, split, delete and undo work there as on any small result,
and it is autosaved like one (a crash loses nothing; it comes back on reopening).
Save into slide writes it back into the run's store, gives the whole-slide layer the
merged table (saved at once), and closes the window.
"""

from __future__ import annotations

import logging

from napari.utils.notifications import show_info, show_warning

from napari_hemato._widgets.review_frame import layer_uid
from napari_hemato.core.errors import HematoError
from napari_hemato.core.store_edits import MERGED_KEY
from napari_hemato.io.layers import KEY

log = logging.getLogger(__name__)


def edit_here(w):
    """Open the view of the whole-slide layer under review as an edit window; the new layer."""
    from napari_hemato.core.engine import open_result
    from napari_hemato.core.region_edit import open_window
    from napari_hemato.io.viewer import camera_box_level0, edit_window_layer_data

    session, layer = w.session, w.layer
    if session is None or not session.annotations.metadata.get("lazy"):
        w.info.setText("Edit here cuts a window out of a whole-slide result layer: choose one "
                       "(smaller results are edited directly)")
        return None
    try:
        result = open_result(session.annotations.metadata["result"])
        view = camera_box_level0(layer, w.viewer)
        ann = open_window(result, session.table.reset_index(drop=True), view)
    except HematoError as err:
        show_warning(str(err))
        w.info.setText(str(err))
        return None
    y0, x0, y1, x1 = ann.metadata["edit"]["box"]
    data, kwargs, _ = edit_window_layer_data(layer, ann, name=f"{layer.name} edit {y0},{x0}")
    window = w.viewer.add_labels(data, **kwargs)
    window.mode = "paint"
    w.bind_layer(window)
    n_cut = len(ann.metadata["edit"]["locked"])
    w.info.setText(f"editing {len(ann.table) - n_cut} objects ({(y1 - y0) * (x1 - x0) / 1e6:.1f} MP)"
                   + (f"; {n_cut} cut by the window's edge stay as they are" if n_cut else "")
                   + ". Save into slide when done")
    return window


def save_window(w) -> dict | None:
    """Write the edit window under review into its slide; a summary of what changed."""
    from napari_hemato.core.engine import open_result
    from napari_hemato.core.region_edit import commit_window
    from napari_hemato.core.sidecar import discard_set

    window, win_session = w.layer, w.session
    edit = win_session.annotations.metadata.get("edit") if win_session is not None else None
    if not edit:
        w.info.setText("Save into slide writes an edit window back: open one with Edit here")
        return None
    slide_layer = next((lyr for lyr in w.viewer.layers
                        if lyr.metadata.get(KEY, {}).get("lazy")
                        and lyr.metadata[KEY].get("result") == edit["result"]), None)
    if slide_layer is None:
        w.info.setText("open the whole-slide result this window was cut from, then save")
        return None
    win_session.sync_with_labels()  # a paint whose event is still queued
    slide_session = w.bind_layer(slide_layer)
    try:
        done = commit_window(open_result(edit["result"]), win_session.to_annotations(),
                             slide_session.table.reset_index(drop=True))
    except HematoError as err:
        w.bind_layer(window)
        show_warning(str(err))
        w.info.setText(str(err))
        return None
    slide_session.adopt_table(done.table)
    if done.token:
        merged = [*slide_session.annotations.metadata.get(MERGED_KEY, []), done.token]
        slide_session.annotations.metadata[MERGED_KEY] = merged
        slide_layer.metadata[KEY][MERGED_KEY] = merged
    w._after_change()  # the slide layer's features, colours and summary from its new table
    slide_layer.refresh()
    # the window's corrections are in the slide now: forget its session (so closing it saves
    # nothing), close it, and remove its autosaved copy
    uid = layer_uid(window)
    name = w._names.pop(uid, window.name)
    w.sessions.pop(uid, None)
    w.viewer.layers.remove(window)
    if win_session.annotations.image_path:
        discard_set(win_session.annotations.image_path, name)
    w.autosave()  # the slide's table, now: its store already holds the new masks
    summary = {"changed": len(done.changed), "added": len(done.added),
               "removed": len(done.removed), "kept_cut_px": done.kept_locked_px,
               "renumbered": len(done.renumbered)}
    text = (f"saved into the slide: {summary['changed']} objects changed "
            f"({summary['added']} new, {summary['removed']} removed)")
    if done.kept_locked_px:
        text += f"; {done.kept_locked_px} px painted on objects cut by the window's edge were put back"
    w.info.setText(text)
    show_info(text)
    return summary
