"""A damaged result store (tile file or labels chunk deleted or truncated): resume redoes it."""

from __future__ import annotations

import json

import pytest

from napari_hemato.cli import main

from .conftest import analyze_cmd, assert_same_result, fresh_copy, non_empty_chunks, report


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _delete(path, keep=None):
    path.unlink()


DAMAGE = {"deleted": _delete, "truncated": _truncate}


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("what", ["tile", "chunk"])
def test_resume_redoes_a_damaged_tile_or_chunk(what, how, tmp_path, field, model_dir, reference):
    store = fresh_copy(reference, tmp_path)
    if what == "tile":
        victims = sorted((store / "tiles").glob("*.npz"))[::9]  # a few, corners and middle
    else:
        victims = non_empty_chunks(store)[::5]
    before = {p: p.read_bytes() for p in victims}
    for path in victims:
        DAMAGE[how](path)
    assert main([*analyze_cmd(field, model_dir, store), "--resume"]) == 0
    assert_same_result(store, reference)
    for path, data in before.items():  # every damaged file was written again, whole
        assert path.read_bytes() == data
    report("corrupted store", what=what, how=how, n=len(victims), survived=True)


def test_a_complete_store_with_a_bad_tile_is_repaired_by_resume(tmp_path, field, model_dir, reference):
    """A truncated tile in a *complete* store: resume rebuilds it and the table."""
    store = fresh_copy(reference, tmp_path)
    (store / "objects.csv").unlink()
    _truncate(next((store / "tiles").glob("*.npz")), keep=0.98)  # even a few bytes short
    assert main([*analyze_cmd(field, model_dir, store), "--resume"]) == 0
    assert_same_result(store, reference)


def test_a_marker_that_lies_is_not_trusted(tmp_path, field, model_dir, reference):
    """An assembled/ marker from an older store (empty) or with a wrong digest: chunk re-assembled."""
    store = fresh_copy(reference, tmp_path)
    chunk = non_empty_chunks(store)[0]
    markers = sorted((store / "assembled").iterdir())
    bad = {m: json.loads(m.read_text()) for m in markers}
    target = next(m for m, rec in bad.items()
                  if store.joinpath("labels", "0", "c", *map(str, (rec["box"][0] // 64,
                                                                   rec["box"][1] // 64))) == chunk)
    chunk.write_bytes(b"\0" * len(chunk.read_bytes()))  # same size, wrong content
    markers[-1].write_text("")  # an old-style empty marker
    assert main([*analyze_cmd(field, model_dir, store), "--resume"]) == 0
    assert_same_result(store, reference)
    assert json.loads(target.read_text())["sha256"] == bad[target]["sha256"]
