"""Shared pieces of the fault suite: a tiny model, a small field, a reference run, kill helpers.

Every fault here is real: real processes killed with SIGKILL, real files truncated or
deleted, a real (tiny) tmpfs filled up. Kill points are chosen by observable progress
(how many tile files exist), never by timing, and tests assert only on outcomes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from ..onnx_models import dark_blob_model_dir
from ..synthetic import disk_image, write_tiff

pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[2]
TILE = 64
N_TILES = 64  # a 512 x 512 field at the model's 0.5 µm/px, 64 px tiles


def env() -> dict:
    """Environment for child processes: the sources this test imports, one inference thread."""
    import napari_hemato

    src = Path(napari_hemato.__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)]),
            "NAPARI_HEMATO_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def report(kind: str, **fields) -> None:
    """Append one fault's outcome to ``$HEMATO_FAULT_REPORT`` (JSON lines), when set."""
    target = os.environ.get("HEMATO_FAULT_REPORT")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps({"fault": kind, **fields}) + "\n")


class Processes:
    """Start real CLI processes (forked by :mod:`.forkserver`) and SIGKILL them on cue."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.server = subprocess.Popen(python("-m", "tests.faults.forkserver"), env=env(), cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait()

    def _start(self, request: dict) -> int:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())["pid"]

    def _wait(self) -> int:
        status = json.loads(self.server.stdout.readline())["status"]
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def run(self, argv: list[str] | None = None, *, code: str | None = None,
            cwd: Path | None = None) -> dict:
        """Run ``napari-hemato ARGV`` (or a Python snippet) to its end."""
        return self.kill_when(argv, lambda: False, code=code, cwd=cwd, never=True)

    def kill_when(self, argv: list[str] | None, ready, *, code: str | None = None,
                  extra_delay: float = 0.0, limit: float = 120.0, cwd: Path | None = None,
                  never: bool = False) -> dict:
        """Start the CLI with ``argv``, SIGKILL it once ``ready()`` is true (plus ``extra_delay`` s).

        ``limit`` only stops a hung child; nothing is asserted on time. Returns what
        happened: whether the child was killed or had already exited, and its stderr.
        """
        err = self.scratch / f"stderr-{uuid.uuid4().hex[:8]}.txt"
        err.touch()  # the child may be killed before it opens it
        request = {"stderr": str(err), "cwd": str(cwd) if cwd else None}
        request.update({"argv": argv} if argv is not None else {"code": code})
        pid = self._start(request)
        deadline = time.monotonic() + limit
        exited = False
        while not never and not ready() and time.monotonic() < deadline:
            if _exited(pid):
                exited = True
                break
            time.sleep(0.002)
        if extra_delay and not exited:
            time.sleep(extra_delay)
        if not never:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        returncode = self._wait()
        stderr = err.read_text(errors="replace")
        err.unlink()
        return {"killed": returncode == -signal.SIGKILL, "returncode": returncode, "stderr": stderr}


def _exited(pid: int) -> bool:
    """True once ``pid`` (a child of the fork server, so not ours to reap) is a zombie or gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.fixture(scope="session")
def procs(tmp_path_factory):
    server = Processes(tmp_path_factory.mktemp("faults-procs"))
    yield server
    server.close()


def n_files(folder: Path, pattern: str = "*.npz") -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def labels_of(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(store / "labels" / "0"), mode="r")[:])


def non_empty_chunks(store: Path) -> list[Path]:
    return sorted(p for p in (store / "labels" / "0" / "c").rglob("*") if p.is_file())


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere under ``folder`` (names starting with '.')."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if ".venv" not in p.parts)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return dark_blob_model_dir(tmp_path_factory.mktemp("faults-model") / "model")


@pytest.fixture(scope="session")
def field(tmp_path_factory) -> Path:
    return write_tiff(tmp_path_factory.mktemp("faults-field") / "field.tif",
                      disk_image((512, 512), n=80, seed=3), mpp=0.5)


def analyze_cmd(field: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir), "--out", str(out),
            "--tile", str(TILE), "--batch", "1", *extra]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, field, model_dir) -> Path:
    """An uninterrupted run of the field (in process, through the CLI)."""
    from napari_hemato.cli import main

    out = tmp_path_factory.mktemp("faults-ref") / "ref.zarr"
    assert main(analyze_cmd(field, model_dir, out)) == 0
    assert n_files(out / "tiles") == N_TILES
    return out


def assert_same_result(store: Path, reference: Path) -> None:
    """Tables (every row, as written) and labels (every pixel) equal the reference's."""
    assert (store / "objects.csv").read_text() == (reference / "objects.csv").read_text()
    np.testing.assert_array_equal(labels_of(store), labels_of(reference))
    cfg = json.loads((store / "zarr.json").read_text())["attributes"]["napari_hemato"]
    assert cfg["status"] == "complete"


def fresh_copy(reference: Path, where: Path) -> Path:
    target = where / f"r-{uuid.uuid4().hex[:6]}.zarr"
    shutil.copytree(reference, target)
    return target


EXPORT_FORMATS = ["crops", "tiff", "omezarr", "coco", "geojson"]


def read_exports(folder: Path, name: str) -> dict:
    """Each export in ``folder`` read back with its importer (raises if partial or unreadable)."""
    from napari_hemato.core import export as ex

    files = {"crops": f"{name}_crops", "tiff": f"{name}_labels.tif", "omezarr": f"{name}.ome.zarr",
             "coco": f"{name}_coco.json", "geojson": f"{name}.geojson"}
    readers = {"crops": ex.import_crops, "tiff": ex.import_tiff, "omezarr": ex.import_omezarr,
               "coco": ex.import_coco, "geojson": ex.import_geojson}
    out = {}
    for fmt, fname in files.items():
        ann = readers[fmt](folder / fname)
        out[fmt] = (ann.table.sort_values("id")["id"].tolist(),
                    None if ann.labels is None or fmt == "crops" else np.asarray(ann.labels))
    return out


def assert_same_exports(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for fmt in want:
        assert got[fmt][0] == want[fmt][0], fmt
        if want[fmt][1] is not None:
            np.testing.assert_array_equal(got[fmt][1], want[fmt][1], err_msg=fmt)


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MiB tmpfs (skips when this sandbox may not mount one); unmounted after."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("disk-full faults need root to mount a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): disk-full faults not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Fill the file system at ``mnt`` with a ballast file until ``leave`` bytes are free."""
    ballast = mnt / "ballast"
    st = os.statvfs(mnt)
    size = st.f_bavail * st.f_frsize - leave
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(size, 0))
    return ballast
