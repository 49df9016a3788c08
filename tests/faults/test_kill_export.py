"""kill -9 during ``napari-hemato export --overwrite``: the previous export stays whole and readable.

Defined behaviour: every output is either the previous export or the new one, whole (each
file is renamed into place; a folder being replaced is moved aside and back). The killed
process's temporary files (``.<pid>-<random>.tmp-<name>``) may remain until the next export
to the same folder, which removes them (and restores a folder caught between its renames).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_hemato.cli import main

from .conftest import EXPORT_FORMATS, assert_same_exports, leftovers, read_exports, report

RNG = np.random.default_rng(7)
# kill once the k-th temporary output has appeared (k = 1..5, one per format), plus a delay
POINTS = list(zip(RNG.integers(1, 6, 5).tolist(), RNG.uniform(0.0, 0.05, 5).tolist(), strict=True))


@pytest.fixture(scope="module")
def first_export(tmp_path_factory, reference):
    dest = tmp_path_factory.mktemp("faults-export") / "exports"
    assert main(["export", str(reference), "--format", *EXPORT_FORMATS, "--out-dir", str(dest),
                 "--name", "r"]) == 0
    return dest, read_exports(dest, "r")


@pytest.mark.parametrize("trial", range(len(POINTS)))
def test_kill9_during_export_keeps_whole_outputs(trial, tmp_path, reference, first_export, procs):
    import shutil

    src, want = first_export
    dest = tmp_path / "exports"
    shutil.copytree(src, dest)
    argv = ["export", str(reference), "--format", *EXPORT_FORMATS, "--out-dir", str(dest),
            "--name", "r", "--overwrite"]
    seen: set[str] = set()
    target, delay = POINTS[trial]

    def progress():  # the child renames and deletes meanwhile: list the folder, do not walk it
        seen.update(name for name in os.listdir(dest) if name.startswith("."))
        return len(seen) >= target

    res = procs.kill_when(argv, progress, extra_delay=delay)
    assert "Traceback" not in res["stderr"], res["stderr"]
    left = leftovers(dest)
    assert_same_exports(read_exports(dest, "r"), want)  # whole and readable, old or new
    assert main(argv) == 0  # the next export cleans up after the killed one
    assert leftovers(dest) == []
    assert_same_exports(read_exports(dest, "r"), want)
    report("kill -9 export", trial=trial, target=target, killed=res["killed"],
           leftovers_after_kill=len(left),
           survived=True)


def test_folder_caught_between_its_renames_is_restored(tmp_path, reference, first_export):
    """The state a kill inside a folder's replace leaves: the old folder aside, the new one a temp."""
    import shutil
    import subprocess
    import sys

    src, want = first_export
    dest = tmp_path / "exports"
    shutil.copytree(src, dest)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(dest / "r.ome.zarr", dest / f".{dead.pid}-abcd1234.old-r.ome.zarr")
    shutil.copytree(dest / "r_crops", dest / f".{dead.pid}-abcd1234.tmp-r_crops")
    from napari_hemato.core.export._atomic import clean_leftovers

    clean_leftovers(dest / "r.ome.zarr")  # what every export to that name does first
    assert_same_exports(read_exports(dest, "r"), want)  # the previous folder is back, whole
    assert main(["export", str(reference), "--format", "crops", "omezarr", "--out-dir", str(dest),
                 "--name", "r", "--overwrite"]) == 0
    assert leftovers(dest) == []
    assert_same_exports(read_exports(dest, "r"), want)
