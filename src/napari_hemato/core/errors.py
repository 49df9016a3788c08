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


class WriteError(HematoError, OSError):
    """A file could not be written (disk full, read-only folder, no permission).

    The message names the file and the reason in one line; ``errno`` is kept.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0])
