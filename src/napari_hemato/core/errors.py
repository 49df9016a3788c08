"""Exceptions raised by napari-hemato with messages meant for users.

Every message names the file (or model) and the problem in one line, so a CLI
can print ``str(error)`` and a widget can show it as a notification.
"""

from __future__ import annotations


class HematoError(Exception):
    """Base class of all errors napari-hemato raises on purpose."""


class SlideError(HematoError, ValueError):
    """A slide or image cannot be opened or has an unsupported layout."""


class ModelError(HematoError, ValueError):
    """A model file or spec is missing, corrupt or does not match its spec."""


class StoreError(HematoError, ValueError):
    """A result store is missing, corrupt or belongs to a different run."""


class Cancelled(HematoError):
    """Raised when a run is cancelled; finished tiles stay on disk."""
