"""Autosave (core.sidecar.save_annotations) under kill -9 and with two viewers saving one set."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from napari_hemato.core import sidecar
from napari_hemato.core.errors import StoreError
from napari_hemato.core.sidecar import load_annotations, save_annotations, saved_sets

from .conftest import report
from .sets import check, version

SAVE_LOOP = """
from napari_hemato.core.sidecar import load_annotations, save_annotations
from tests.faults.sets import version
folder, log = {folder!r}, {log!r}
ann = load_annotations(folder)
v = int(ann.table["version"].iloc[0])
while True:
    v += 1
    new = version(v)
    new.metadata.update(ann.metadata)   # based on the revision it loaded, then its own saves
    save_annotations(new, folder)
    ann = new
    with open(log, "a") as fh:
        fh.write(f"{{v}}\\n")
"""

RNG = np.random.default_rng(99)
KILLS = [(int(n), float(d)) for n, d in zip(RNG.integers(0, 4, 6), RNG.uniform(0, 0.1, 6),
                                            strict=True)]


@pytest.mark.parametrize("trial", range(len(KILLS)))
def test_kill9_during_autosave_keeps_a_whole_version(trial, tmp_path, procs):
    sets = tmp_path / "field.tif.hemato"
    folder = sets / "cells"
    save_annotations(version(0), folder)
    log = tmp_path / "saved.txt"
    log.touch()
    after, delay = KILLS[trial]
    code = SAVE_LOOP.format(folder=str(folder), log=str(log))
    res = procs.kill_when(None, lambda: len(log.read_text().split()) >= after, code=code,
                          extra_delay=delay)
    assert res["killed"], res["stderr"]
    done = [int(v) for v in log.read_text().split()]
    last = done[-1] if done else 0
    assert list(saved_sets(tmp_path / "field.tif")) == ["cells"]  # found (restored if need be)
    v = check(load_annotations(folder))
    assert v in (last, last + 1), "a completed save was lost"
    save_annotations(load_annotations(folder), folder)  # the next save cleans up
    assert sorted(p.name for p in sets.iterdir()) == ["cells"]
    report("kill -9 autosave", trial=trial, saves_done=len(done), loaded=v, survived=True)


def test_killed_between_the_two_renames_is_restored(tmp_path):
    """The state a kill between the save's two renames leaves: only ``.cells.old`` and a temp."""
    sets = tmp_path / "img.png.hemato"
    folder = save_annotations(version(1), sets / "cells")
    os.replace(folder, sets / ".cells.old")
    shutil.copytree(sets / ".cells.old", sets / ".cells.ab12cd34")
    (sets / ".cells.ab12cd34" / "labels.npz").write_bytes(b"PK\x03\x04 half")
    assert list(saved_sets(tmp_path / "img.png")) == ["cells"]
    assert check(load_annotations(folder)) == 1
    save_annotations(load_annotations(folder), folder)
    assert sorted(p.name for p in sets.iterdir()) == ["cells"]


VIEWER = """
import time
from pathlib import Path
from napari_hemato.core.sidecar import load_annotations, save_annotations
folder, me, go = Path({folder!r}), {me!r}, Path({go!r})
ann = load_annotations(folder)         # both viewers open the same version
(folder.parent.parent / f"loaded-{{me}}").touch()
while not go.exists():
    time.sleep(0.005)
rows = ann.table["id"] == {obj}
ann.table.loc[rows, "class"] = "B"     # each corrects a different object
ann.table.loc[rows, "provenance"] = me
saved = save_annotations(ann, folder)
(folder.parent.parent / f"saved-{{me}}").write_text(saved.name)
"""


def test_two_viewers_correcting_one_set_lose_no_update(tmp_path, procs):
    """Two real processes load one set, each corrects an object, both save at once."""
    import subprocess

    from .conftest import env, python

    sets = tmp_path / "field.tif.hemato"
    folder = save_annotations(version(0), sets / "cells")
    go = tmp_path / "go"
    children = []
    for me, obj in (("viewer-a", 1), ("viewer-b", 2)):
        code = VIEWER.format(folder=str(folder), me=me, go=str(go), obj=obj)
        children.append(subprocess.Popen(python("-c", code), env=env(), stderr=subprocess.PIPE))
    while not all((tmp_path / f"loaded-{me}").exists() for me in ("viewer-a", "viewer-b")):
        assert all(c.poll() is None for c in children), children[0].stderr.read()
    go.touch()
    for c in children:
        assert c.wait() == 0, c.stderr.read().decode()
        c.stderr.close()
    names = sorted(saved_sets(tmp_path / "field.tif"))
    assert names == ["cells", "cells (copy 1)"]
    found = {}
    for name in names:
        t = load_annotations(sets / name).table.set_index("id")
        check(load_annotations(sets / name))
        corrected = t[t["class"] == "B"]
        assert len(corrected) == 1  # each set holds one viewer's whole version
        found[corrected["provenance"].iloc[0]] = int(corrected.index[0])
    assert found == {"viewer-a": 1, "viewer-b": 2}  # both corrections kept
    saved = {me: (tmp_path / f"saved-{me}").read_text() for me in found}
    assert sorted(saved.values()) == names
    assert not any(p.name.endswith(".lock") for p in sets.iterdir())
    report("two viewers", survived=True, sets=names)


def test_saving_after_reloading_the_other_viewers_save_is_no_conflict(tmp_path):
    folder = save_annotations(version(0), tmp_path / "s" / "cells")
    a, b = load_annotations(folder), load_annotations(folder)
    a.table.loc[0, "class"] = "B"
    save_annotations(a, folder)
    b = load_annotations(folder)  # b reloads a's save, then corrects
    b.table.loc[1, "class"] = "B"
    assert save_annotations(b, folder) == folder
    assert (load_annotations(folder).table["class"] == "B").sum() == 2
    assert save_annotations(b, folder) == folder  # its own previous save is its base


def test_a_dead_process_lock_is_taken_over_a_live_one_waited_for(tmp_path, monkeypatch):
    import subprocess
    import sys

    folder = save_annotations(version(0), tmp_path / "s" / "cells")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = folder.with_name(".cells.lock")
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "time": 0}))
    assert save_annotations(load_annotations(folder), folder) == folder
    assert not lock.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "time": 0}))
        monkeypatch.setattr(sidecar, "LOCK_WAIT_S", 0.2)
        with pytest.raises(StoreError, match="another process is saving it"):
            save_annotations(load_annotations(folder), folder)
    finally:
        live.kill()
        live.wait()
    assert check(load_annotations(folder)) == 0
