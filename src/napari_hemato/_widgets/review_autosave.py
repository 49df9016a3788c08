"""The Review dock's autosave: every changed review session saved next to its image."""

from __future__ import annotations

from pathlib import Path

from napari_hemato._widgets.review_frame import layer_uid
from napari_hemato.core.sidecar import REVISION, autosave
from napari_hemato.io.layers import KEY


def save_sessions(w) -> Path | None:
    """Save every changed session next to its image."""
    saved = None
    layers = {}
    for layer in list(w.viewer.layers):
        uid = layer_uid(layer)
        if uid in w.sessions:
            layers[uid] = layer
            w._names[uid] = layer.metadata.get(KEY, {}).get("sidecar_name", layer.name)
    for uid, session in w.sessions.items():
        if session.revision == w._saved_revision.get(uid) or uid not in w._names:
            continue
        name = w._names[uid]
        layer = layers.get(uid)
        ann = session.to_annotations()
        path = autosave(ann, name)
        if path is not None:
            saved = path
            # the revision saved is the base of the next save; another viewer's newer save
            # made this one a copy: keep saving this layer there (nothing is overwritten)
            session.annotations.metadata[REVISION] = ann.metadata[REVISION]
            w._names[uid] = path.name
            if layer is not None:
                layer.metadata.setdefault(KEY, {}).update(
                    {REVISION: ann.metadata[REVISION], "sidecar_name": path.name})
            if path.name != name:
                from napari.utils.notifications import show_warning

                show_warning(f"{name} was changed by another viewer: your corrections are "
                             f"saved as {path.name}")
            w._saved_revision[uid] = session.revision
    return saved
