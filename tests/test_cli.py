"""The napari-hemato command line, in process and as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from napari_hemato.cli import main

from .onnx_models import dark_blob_model_dir
from .synthetic import disk_image, write_tiff

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return dark_blob_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    return write_tiff(tmp_path_factory.mktemp("s") / "field.tif", disk_image((400, 520), n=50), mpp=0.5)


def test_help_for_every_subcommand(capsys):
    for sub in ([], ["info"], ["analyze"], ["demo"], ["models"], ["classify-cells"]):
        with pytest.raises(SystemExit) as exit_:
            main([*sub, "--help"])
        assert exit_.value.code == 0
        assert "usage: napari-hemato" in capsys.readouterr().out
    for sub in (["train"], ["evaluate"]):
        assert main([*sub, "--help"]) == 0
        assert "TASK --help" in capsys.readouterr().out


def test_info_real_svs(svs_path, capsys):
    assert main(["info", str(svs_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == pytest.approx(0.499)
    assert info["levels"][0]["shape"][:2] == [2967, 2220]


def test_analyze_writes_store_table_and_summary(tmp_path, field, model_dir, capsys):
    out = tmp_path / "r.zarr"
    code = main(["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out", str(out), "--table", str(tmp_path / "objects.csv"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_objects"] == 50 and summary["status"] == "complete"
    table = pd.read_csv(tmp_path / "objects.csv")
    assert len(table) == 50 and {"id", "y", "x", "class", "prob_nucleus"} <= set(table.columns)


def test_analyze_roi_and_human_summary(tmp_path, field, model_dir, capsys):
    code = main(["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out", str(tmp_path / "r.zarr"), "--roi", "0,0,200,260"])
    assert code == 0
    text = capsys.readouterr().out
    assert "objects" in text and "nucleus" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "missing.svs"], "missing.svs"),
        (["analyze", "FIELD", "--task", "nuclei", "--tissue", "none", "--model", "nowhere"], "nowhere"),
        (["analyze", "FIELD", "--task", "mitosis", "--tissue", "none", "--model", "MODEL"], "is for task 'nuclei'"),
        (["analyze", "FIELD", "--task", "nuclei", "--tissue", "none", "--model", "MODEL", "--roi", "900,900,990,990"],
         "outside the image"),
        (["analyze", "FIELD", "--task", "nuclei", "--tissue", "none", "--model", "MODEL", "--tile", "16"],
         "use a tile of at least"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tmp_path, field, model_dir, capsys, argv, message):
    argv = [str(field) if a == "FIELD" else str(model_dir) if a == "MODEL" else a for a in argv]
    if argv[0] == "analyze":
        argv += ["--out", str(tmp_path / "r.zarr")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("napari-hemato: error:")


def test_bad_roi_syntax_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "x.tif", "--task", "nuclei", "--tissue", "none", "--roi", "1,2,3"])
    assert exit_.value.code == 2
    assert "y0,x0,y1,x1" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_tiles(tmp_path, model_dir):
    """SIGKILL the CLI mid-run; --resume keeps every tile file written before the kill."""
    big = write_tiff(tmp_path / "big.tif", disk_image((1600, 1600), n=400, seed=5), mpp=0.5)
    out = tmp_path / "r.zarr"
    cmd = [sys.executable, "-m", "napari_hemato", "analyze", str(big), "--task", "nuclei", "--tissue", "none",
           "--model", str(model_dir), "--out", str(out), "--tile", "64", "--batch", "1"]
    env = {**os.environ, "NAPARI_HEMATO_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tiles = out / "tiles"
    # kill once 30 tiles are on disk, however slow the machine (polling, no deadline)
    while proc.poll() is None and len(list(tiles.glob("*.npz")) if tiles.exists() else []) < 30:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.npz")}
    assert 30 <= len(before) < 625, "the run must be killed mid-way"

    done = subprocess.run([*cmd, "--resume", "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.npz")}
    assert len(after) == 625
    assert all(after[name] == mtime for name, mtime in before.items())
    assert json.loads(done.stdout)["n_objects"] == 400


def test_batch_folder_writes_one_table_and_label_image_per_input(tmp_path, model_dir, capsys):
    from tifffile import TiffFile

    folder = tmp_path / "fields"
    folder.mkdir()
    for k in range(3):
        write_tiff(folder / f"f{k}.tif", disk_image((200, 260), n=10 + k, seed=k), mpp=0.5)
    (folder / "notes.txt").write_text("not an image")
    code = main(["analyze", str(folder), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out-dir", str(tmp_path / "out"), "--labels", "--json"])
    assert code == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["n_objects"] for s in summaries] == [10, 11, 12]
    for k in range(3):
        assert (tmp_path / "out" / f"f{k}.tif.nuclei.hemato.zarr" / "objects.csv").exists()
        table = pd.read_csv(tmp_path / "out" / f"f{k}.nuclei.csv")
        labels = TiffFile(tmp_path / "out" / f"f{k}.nuclei_labels.tif").pages[0].asarray()
        assert labels.shape == (200, 260) and labels.dtype == "uint32"
        assert set(table["id"]) == set(labels[labels > 0].ravel())


def test_labels_tiff_is_on_the_input_pixel_grid(tmp_path, model_dir):
    """Input at 0.25 µm/px, model at 0.5: the TIFF still has the input's shape and places objects right."""
    import tifffile

    image = disk_image((300, 360), n=12, radius=(8, 14), seed=7)
    path = write_tiff(tmp_path / "fine.tif", image, mpp=0.25)
    assert main(["analyze", str(path), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out", str(tmp_path / "r.zarr"), "--labels", str(tmp_path / "l.tif"),
                 "--table", str(tmp_path / "t.csv")]) == 0
    labels = tifffile.imread(tmp_path / "l.tif")
    table = pd.read_csv(tmp_path / "t.csv")
    assert labels.shape == (300, 360)
    dark = image.mean(axis=-1) < 128
    agreement = (labels > 0) == dark
    assert agreement.mean() > 0.97
    for row in table.itertuples():
        assert labels[int(round(row.y)), int(round(row.x))] == row.id


@pytest.fixture(scope="module")
def mitosis_model_dir(tmp_path_factory):
    return dark_blob_model_dir(
        tmp_path_factory.mktemp("m") / "mitosis", task="mitosis", kind="points",
        class_names=("mitosis",), outputs={"heatmap": "fg"},
        postprocess={"threshold": 0.5, "min_distance_um": 4.0})


def test_default_outputs_carry_the_task(tmp_path, field, model_dir, mitosis_model_dir,
                                        monkeypatch, capsys):
    """nuclei then mitosis on one image: two stores; --overwrite of one leaves the other."""
    monkeypatch.chdir(tmp_path)
    nuclei = ["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir), "--json"]
    mitosis = ["analyze", str(field), "--task", "mitosis", "--tissue", "none", "--model", str(mitosis_model_dir), "--json"]
    results = []
    for argv in ([*nuclei, "--labels"], mitosis):
        assert main(argv) == 0
        results.append(Path(json.loads(capsys.readouterr().out)["result"]).name)
    assert results == ["field.tif.nuclei.hemato.zarr", "field.tif.mitosis.hemato.zarr"]
    assert (tmp_path / "field.nuclei_labels.tif").exists()
    mitosis_table = (tmp_path / "field.tif.mitosis.hemato.zarr" / "objects.csv").read_bytes()
    assert main([*nuclei, "--overwrite"]) == 0
    assert (tmp_path / "field.tif.mitosis.hemato.zarr" / "objects.csv").read_bytes() == mitosis_table
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "field.nuclei_labels.tif", "field.tif.mitosis.hemato.zarr", "field.tif.nuclei.hemato.zarr"]
    for task in ("nuclei", "mitosis"):  # their exports sit side by side too
        assert main(["export", f"field.tif.{task}.hemato.zarr", "--format", "geojson",
                     "--out-dir", "ex"]) == 0
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["field.mitosis.geojson",
                                                                  "field.nuclei.geojson"]


def test_one_image_honours_out_dir(tmp_path, field, model_dir, monkeypatch, capsys):
    """--out-dir with one IMAGE: store, table and --labels go there, as in folder mode."""
    from tifffile import TiffFile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    out_dir = tmp_path / "res"
    assert main(["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out-dir", str(out_dir), "--labels", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not list((tmp_path / "here").iterdir())
    assert summary["result"] == str(out_dir / "field.tif.nuclei.hemato.zarr")
    assert summary["table"] == str(out_dir / "field.nuclei.csv")
    assert summary["labels"] == str(out_dir / "field.nuclei_labels.tif")
    table = pd.read_csv(out_dir / "field.nuclei.csv")
    labels = TiffFile(out_dir / "field.nuclei_labels.tif").pages[0].asarray()
    assert len(table) == 50 and set(table["id"]) == set(labels[labels > 0].ravel())
    # explicit paths still win over the folder's defaults
    assert main(["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out-dir", str(out_dir), "--out", str(tmp_path / "x.zarr"),
                 "--table", str(tmp_path / "x.csv"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["result"] == str(tmp_path / "x.zarr") and summary["table"] == str(tmp_path / "x.csv")


def test_batch_refuses_inputs_whose_results_would_collide(tmp_path, model_dir, capsys):
    image = disk_image((200, 260), n=5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_tiff(tmp_path / "a" / "f.tif", image, mpp=0.5)
    b = write_tiff(tmp_path / "b" / "f.tif", image, mpp=0.5)
    assert main(["analyze", str(a), str(b), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir),
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "would write the same results" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batch_needs_out_dir(tmp_path, field, model_dir, capsys):
    assert main(["analyze", str(field), str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir)]) == 2
    assert "--out-dir" in capsys.readouterr().err


def test_export_from_result_store_roundtrips(tmp_path, field, model_dir, capsys):
    from napari_hemato.core.engine import open_result
    from napari_hemato.core.export import import_geojson

    store = tmp_path / "r.zarr"
    assert main(["analyze", str(field), "--task", "nuclei", "--tissue", "none", "--model", str(model_dir), "--out", str(store)]) == 0
    reopened = open_result(store)
    assert reopened.status == "complete" and reopened.spec.name == "test-dark-blobs"
    assert main(["export", str(store), "--format", "geojson", "coco", "tiff", "crops",
                 "--out-dir", str(tmp_path / "ex")]) == 0
    printed = capsys.readouterr().out
    assert "geojson" in printed and (tmp_path / "ex" / "r_crops" / "manifest.csv").exists()
    back = import_geojson(tmp_path / "ex" / "r.geojson")
    assert sorted(back.table["id"]) == sorted(reopened.table()["id"])
    assert main(["export", str(store), "--format", "points_csv", "--out-dir", str(tmp_path / "ex")]) == 2


def test_models_lists_which_network_the_cpu_runs(capsys):
    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.registry import bundled_models

    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
             if line and not line.startswith(" ")}
    for task, folder in bundled_models().items():
        assert ("int8 networks" in lines[task]) == (load_spec(folder).int8 is not None)
    # which ones a user can fine-tune without torch (they ship their replay)
    assert {t for t, line in lines.items() if f"finetune {t}" in line} == {"wbc", "mitosis", "nuclei", "smear"}


def test_classify_cells_writes_the_documented_csv(tmp_path, shared_data, capsys):
    from napari_hemato.models.registry import bundled_models

    if "wbc" not in bundled_models():
        pytest.skip("no bundled WBC model")
    images = [next(iter(sorted((shared_data / "pbc" / c).iterdir()))) for c in ("EO", "LY", "PLT")]
    out = tmp_path / "cells.csv"
    assert main(["classify-cells", *map(str, images), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    names = ["SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT"]
    assert list(table.columns) == ["path", "class", "confidence", *(f"prob_{n}" for n in names)]
    assert table[[f"prob_{n}" for n in names]].sum(axis=1).round(2).eq(1.0).all()
    assert "classified 3 cell image(s)" in capsys.readouterr().out
    assert main(["classify-cells", str(images[0]), "--out", str(out)]) == 2  # exists: refused
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])  # a truncated JPEG: skipped, the rest kept
    assert main(["classify-cells", str(broken), *map(str, images), "--out", str(out),
                 "--overwrite"]) == 2
    captured = capsys.readouterr()
    assert "skipped" in captured.err + captured.out and "1 unreadable" in captured.out
    assert len(pd.read_csv(out)) == 3


def test_train_and_evaluate_show_the_trainers_progress_logs(monkeypatch, capsys):
    """Without --verbose the CLI logs at WARNING; trainers' per-epoch INFO lines must still show."""
    import logging
    import types

    seen = {}

    def fake_main(argv):
        log = logging.getLogger("napari_hemato.train.fake")
        seen["argv"] = argv
        seen["info_enabled"] = log.isEnabledFor(logging.INFO)
        return 0

    monkeypatch.setattr("importlib.import_module", lambda name: types.SimpleNamespace(main=fake_main))
    monkeypatch.setattr(logging.getLogger("napari_hemato"), "level", logging.NOTSET)
    assert main(["train", "smear", "--data", "d", "--out", "o"]) == 0
    assert seen == {"argv": ["--data", "d", "--out", "o"], "info_enabled": True}


@pytest.mark.parametrize("origin, mpp, said", [
    ("confirmed", 0.08, "0.08 µm/px, the training images', which its red cells confirm"),
    ("measured", 0.0649, "0.0649 µm/px MEASURED on its red cells"),
    ("assumed", 0.08, "ASSUMED 0.08 µm/px"),
    ("stated", 0.499, None),
])
def test_summary_says_where_the_pixel_size_came_from(capsys, origin, mpp, said):
    from napari_hemato.cli.analyze import print_summary

    print_summary({"task": "smear", "image": "f.jpg", "model": "m 1", "megapixels": 0.3,
                   "work_mpp": 0.16, "input_mpp": mpp, "mpp_assumed": origin == "assumed",
                   "input_mpp_origin": origin, "seconds": 1.0,
                   "tiles": 1, "megapixels_per_s": 0.3, "n_objects": 0, "counts": {},
                   "percent": {}, "mean_confidence": None, "result": "r.zarr", "status": "complete"})
    line = [ln for ln in capsys.readouterr().out.splitlines() if "analysed" in ln][0]
    assert (said in line) if said else ("pixel size" not in line)


def test_demo_points_to_a_command_that_works(tmp_path, field, model_dir, capsys, monkeypatch):
    """Issue 13 item 10: no 'napari <path>' that fails without Qt; --view says what to install."""
    import napari_hemato.cli.analyze as cli_analyze
    from napari_hemato.api import analyze

    def fast(slide, *, task, out_store, overwrite):  # the tiny model on the synthetic field
        return analyze(field, task=task, model=model_dir, out=out_store, overwrite=overwrite)

    monkeypatch.setattr(cli_analyze, "run_analysis", fast)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "napari-hemato demo --view" in text and "napari-hemato[viewer]" in text
    assert "Open in napari:  napari " not in text

    monkeypatch.setattr(cli_analyze, "qt_binding", lambda: None)
    monkeypatch.setattr(cli_analyze, "run_analysis", lambda *a, **k: pytest.fail("ran anyway"))
    assert main(["demo", "--view", "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "Qt binding" in err and "pip install 'napari-hemato[viewer]'" in err


def test_the_viewer_extra_is_napari_with_a_qt_binding():
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    assert any(d.startswith("napari[pyqt6]") for d in extras["viewer"])


def test_each_command_is_registered_by_the_module_the_fast_path_imports():
    """``main`` imports only the named command's module: the map must match the parser."""
    import argparse

    from napari_hemato.cli import COMMANDS, MODULES, build_parser

    def commands(parser):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    assert commands(build_parser()) == set(COMMANDS) and set(COMMANDS.values()) == set(MODULES)
    for command, module in COMMANDS.items():
        assert command in commands(build_parser(command))
        assert commands(build_parser(command)) == {c for c, m in COMMANDS.items() if m == module}


def test_classify_cells_starts_without_the_task_registry():
    import subprocess
    import sys

    code = ("import sys\nfrom napari_hemato.cli import main\ntry:\n    main(['-v', 'classify-cells', "
            "'--help'])\nexcept SystemExit:\n    pass\nprint('napari_hemato.tasks' in sys.modules, "
            "'pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-2:] == ["False", "False"], done.stdout
