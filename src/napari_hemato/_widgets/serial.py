"""Run a worker's signal handlers one at a time, in the order the signals came.

A handler that lets Qt process events (napari's progress bar and adding a layer
both can) may otherwise have the worker's next queued signal delivered *inside*
it: the run's "returned" handler then runs in the middle of a progress handler
and clears the state the progress handler goes on to use (a ``TypeError`` in
the Qt event loop, or a "running" preview layer left behind after the run).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class SerialHandlers:
    """Wrap handlers so that a handler never starts while another is running.

    A call that arrives while a handler runs is queued and run right after it,
    in arrival order. ``wrap`` takes a getter so that the handler is looked up
    when the signal arrives (a test may replace it on the instance).
    """

    def __init__(self) -> None:
        self._queue: deque = deque()
        self._busy = False

    def wrap(self, get_handler: Callable[[], Callable]) -> Callable:
        def call(*args) -> None:
            self._queue.append((get_handler, args))
            if self._busy:
                return  # run by the outer call once the current handler returns
            self._busy = True
            error = None
            try:
                while self._queue:
                    getter, queued_args = self._queue.popleft()
                    try:
                        getter()(*queued_args)
                    except Exception as exc:  # noqa: BLE001 - re-raised below; the later handlers still run
                        error = error or exc
            finally:
                self._busy = False
            if error is not None:
                raise error

        return call
