"""Undoable steps of a review session: what one action changed, rows and label pixels."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd


@dataclass
class Step:
    """One undoable action: row values (``ids``) or whole tables, and label pixels."""

    action: str
    before: pd.DataFrame
    after: pd.DataFrame
    ids: list[int] | None = None  # row-level step; None: ``before``/``after`` are whole tables
    pixels: tuple | None = None  # (flat indices, old values, new values)


def recorded(action: str):
    """Make a method one undoable step (whole table + label pixels)."""
    def wrap(method):
        @functools.wraps(method)
        def inner(self, *args, **kwargs):
            with self._step(action):
                return method(self, *args, **kwargs)
        return inner
    return wrap
