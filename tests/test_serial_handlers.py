"""Handlers wrapped by SerialHandlers never nest and keep arrival order."""

from __future__ import annotations

import pytest

from napari_hemato._widgets.serial import SerialHandlers


def test_a_call_made_inside_a_handler_runs_after_it_in_order():
    serial, log = SerialHandlers(), []
    done = serial.wrap(lambda: lambda value: log.append(("done", value)))

    def progress(value):
        log.append(("progress start", value))
        if value == 1:  # Qt delivering queued signals inside this handler
            nested(2)
            done("result")
        log.append(("progress end", value))

    nested = serial.wrap(lambda: progress)
    nested(1)
    assert log == [("progress start", 1), ("progress end", 1), ("progress start", 2),
                   ("progress end", 2), ("done", "result")]


def test_a_failing_handler_does_not_swallow_the_ones_queued_behind_it():
    serial, log = SerialHandlers(), []
    finished = serial.wrap(lambda: lambda: log.append("finished"))

    def failing():
        finished()
        raise ValueError("bad event")

    with pytest.raises(ValueError, match="bad event"):
        serial.wrap(lambda: failing)()
    assert log == ["finished"]
    finished()  # not stuck busy after the error
    assert log == ["finished", "finished"]
