"""kill -9 during ``analyze`` at seeded random points; ``--resume`` gives the uninterrupted result."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.cli import main

from .conftest import (
    N_TILES,
    analyze_cmd,
    assert_same_result,
    leftovers,
    n_files,
    report,
)

TRIALS = 10
# the kill points: once 1..N_TILES tile files exist, plus a random extra delay; trial 0
# kills while the store is being created, trial 1 once every tile exists (stitching, table)
RNG = np.random.default_rng(20260902)
POINTS = [(int(n), float(d)) for n, d in zip(
    np.concatenate([[-1, N_TILES], RNG.integers(1, N_TILES, TRIALS - 2)]),
    np.concatenate([[0.0], RNG.uniform(0.0, 0.2, TRIALS - 1)]), strict=True)]


def _progress(out):
    if not out.exists():  # -1: the store is still being built under a temporary name
        return -1 if any(out.parent.glob(f".{out.name}.*.creating")) else -2
    return n_files(out / "tiles")


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill9_then_resume_equals_uninterrupted(trial, tmp_path, field, model_dir, reference, procs):
    target, delay = POINTS[trial]
    out = tmp_path / "run.zarr"
    cmd = analyze_cmd(field, model_dir, out)
    first = procs.kill_when(cmd, lambda: _progress(out) >= target, extra_delay=delay)
    assert "Traceback" not in first["stderr"], first["stderr"]
    at_kill = n_files(out / "tiles")
    second = None
    if trial % 3 == 1:  # kill the resumed run too, a few tiles further on
        second = procs.kill_when([*cmd, "--resume"],
                           lambda: n_files(out / "tiles") >= min(N_TILES, at_kill + 5))
    assert main([*cmd, "--resume"]) == 0
    assert_same_result(out, reference)
    assert leftovers(tmp_path) == [], "temporary files left behind"
    report("kill -9 analyze", trial=trial, target=target, tiles_at_kill=at_kill,
           killed=first["killed"], returncode=first["returncode"], killed_again=bool(second and second["killed"]), survived=True)
