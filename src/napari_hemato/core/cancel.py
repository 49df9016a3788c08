"""A thread-safe cancel token shared by the engine, predictors and widgets."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CancelToken:
    """Request cancellation from any thread; long calls register a callback.

    The engine checks :attr:`cancelled` between batches; a predictor running a
    long inference registers a callback (e.g. onnxruntime's
    ``RunOptions.terminate``) so cancelling interrupts it within a second.

    Examples
    --------
    >>> token = CancelToken()
    >>> token.cancel()
    >>> token.cancelled
    True
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def register(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on cancel (at once if already cancelled); returns an unregister."""
        with self._lock:
            self._callbacks.append(callback)
            already = self._event.is_set()
        if already:
            callback()

        def unregister() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unregister
