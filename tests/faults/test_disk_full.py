"""Disk full (a real 2 MiB tmpfs) during analyze, export and autosave.

Each fault: the CLI exits 2 with one line naming the file (no traceback), the
previous files are intact, nothing temporary is left, and after space is freed
(the ballast file deleted) a resume / retry completes with the normal result.
"""

from __future__ import annotations

import pytest

from napari_hemato.cli import main
from napari_hemato.core.errors import WriteError
from napari_hemato.core.sidecar import load_annotations, save_annotations

from .conftest import (
    EXPORT_FORMATS,
    analyze_cmd,
    assert_same_exports,
    assert_same_result,
    fill,
    leftovers,
    n_files,
    read_exports,
    report,
)
from .sets import check, version


def _one_line_error(res, where):
    err = res["stderr"].strip()
    assert res["returncode"] == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("napari-hemato: error: ") and str(where) in err, err
    assert "No space left on device" in err, err


@pytest.mark.parametrize("leave", [0, 40_000, 160_000])
def test_disk_full_during_analyze_then_resume(leave, tiny_fs, field, model_dir, reference, procs):
    out = tiny_fs / "run.zarr"
    ballast = fill(tiny_fs, leave)
    res = procs.run(analyze_cmd(field, model_dir, out))
    _one_line_error(res, tiny_fs)
    tiles = n_files(out / "tiles")
    assert leftovers(tiny_fs) == []
    ballast.unlink()  # space freed
    assert main([*analyze_cmd(field, model_dir, out), "--resume"]) == 0
    assert_same_result(out, reference)
    report("disk full analyze", free_bytes=leave, tiles_before=tiles, survived=True)


def test_disk_full_during_export_keeps_the_previous_export(tiny_fs, reference, procs):
    dest = tiny_fs / "exports"
    assert main(["export", str(reference), "--format", *EXPORT_FORMATS, "--out-dir", str(dest),
                 "--name", "r"]) == 0
    before = read_exports(dest, "r")
    ballast = fill(tiny_fs, 60_000)
    res = procs.run(["export", str(reference), "--format", *EXPORT_FORMATS, "--out-dir", str(dest),
                     "--name", "r", "--overwrite"])
    _one_line_error(res, dest)
    assert_same_exports(read_exports(dest, "r"), before)
    assert leftovers(tiny_fs) == []
    ballast.unlink()
    assert main(["export", str(reference), "--format", *EXPORT_FORMATS, "--out-dir", str(dest),
                 "--name", "r", "--overwrite"]) == 0
    assert_same_exports(read_exports(dest, "r"), before)
    report("disk full export", survived=True)


def test_disk_full_during_autosave_keeps_the_previous_version(tiny_fs):
    folder = tiny_fs / "field.tif.hemato" / "cells"
    save_annotations(version(0), folder)
    ballast = fill(tiny_fs, 20_000)
    new = load_annotations(folder)
    new.table["version"] = 1
    with pytest.raises(WriteError) as info:
        save_annotations(new, folder)
    msg = str(info.value)
    assert str(folder.parent) in msg and "No space left on device" in msg and "\n" not in msg
    assert check(load_annotations(folder)) == 0
    assert sorted(p.name for p in folder.parent.iterdir()) == ["cells"]
    ballast.unlink()
    after = version(1)
    after.metadata.update(load_annotations(folder).metadata)
    assert save_annotations(after, folder) == folder
    assert check(load_annotations(folder)) == 1
    report("disk full autosave", survived=True)


def test_disk_full_writing_the_table_copy_is_one_line(tiny_fs, tmp_path, field, model_dir, procs):
    """``--table`` on a full disk (the store elsewhere): one line, exit 2; a resume then writes it."""
    ballast = fill(tiny_fs, 0)
    table = tiny_fs / "cells.csv"
    res = procs.run([*analyze_cmd(field, model_dir, tmp_path / "r.zarr"), "--table", str(table)])
    _one_line_error(res, "")
    ballast.unlink()
    assert main([*analyze_cmd(field, model_dir, tmp_path / "r.zarr"), "--resume",
                 "--table", str(table)]) == 0
    assert table.read_text() == (tmp_path / "r.zarr" / "objects.csv").read_text()
    assert str(tiny_fs) in res["stderr"]  # the line names the table, not the store's objects.csv
