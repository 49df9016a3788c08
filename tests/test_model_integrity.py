"""A model's spec names the sha256 of its weights; nothing the runtime loads is a pickle."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
from pathlib import Path

import pytest

import napari_hemato
from napari_hemato.core.errors import ModelError
from napari_hemato.core.spec import ModelSpec, check_weights, file_sha256, load_spec, write_spec
from napari_hemato.models.registry import bundled_models

from .onnx_models import build_dark_blob_onnx, dark_blob_model_dir

pytest.importorskip("onnx")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("task", sorted(bundled_models()))
def test_bundled_specs_carry_the_sha256_of_their_weights(task):
    spec = load_spec(bundled_models()[task])
    assert spec.sha256 == sha256(spec.onnx_path)
    check_weights(spec)


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path):
    from napari_hemato.models.onnx_backend import OnnxPredictor

    folder = dark_blob_model_dir(tmp_path / "model")
    expected = json.loads((folder / "model.json").read_text())["sha256"]
    assert expected == sha256(folder / "model.onnx")
    OnnxPredictor(folder)  # as written: fine
    build_dark_blob_onnx(folder / "model.onnx", level=0.6)  # other weights, same spec
    with pytest.raises(ModelError) as info:
        OnnxPredictor(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder))
    assert (f"model.onnx does not match model.json: sha256 {sha256(folder / 'model.onnx')} "
            f"expected {expected}") in message
    assert "re-export" in message
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:100])  # truncated
    with pytest.raises(ModelError, match="does not match model.json"):
        OnnxPredictor(folder)


def test_a_malformed_sha256_is_a_spec_error(tmp_path):
    folder = dark_blob_model_dir(tmp_path / "model")
    raw = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**raw, "sha256": 12}))
    with pytest.raises(ModelError, match="'sha256' must be 64 hex digits"):
        load_spec(folder)


def test_cli_names_the_mismatched_model_in_one_line(tmp_path, capsys):
    from napari_hemato.cli import main

    from .synthetic import disk_image, write_tiff

    folder = dark_blob_model_dir(tmp_path / "model")
    build_dark_blob_onnx(folder / "model.onnx", level=0.6)
    field = write_tiff(tmp_path / "f.tif", disk_image((64, 64), n=2), mpp=0.5)
    assert main(["analyze", str(field), "--task", "nuclei", "--model", str(folder),
                 "--out", str(tmp_path / "r.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and "does not match model.json" in err[0]
    assert not (tmp_path / "r.zarr").exists()


def test_spec_without_sha256_loads_with_a_warning(tmp_path, caplog):
    from napari_hemato.models.onnx_backend import OnnxPredictor

    folder = dark_blob_model_dir(tmp_path / "old_model")
    raw = json.loads((folder / "model.json").read_text())
    del raw["sha256"]
    (folder / "model.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="napari_hemato"):
        predictor = OnnxPredictor(folder)
    assert predictor.spec.sha256 is None and "sha256" not in predictor.spec.to_dict()
    assert any("records no sha256" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_write_spec_adds_the_hash_and_changes_nothing_else(tmp_path):
    folder = dark_blob_model_dir(tmp_path / "m")
    spec = {k: v for k, v in json.loads((folder / "model.json").read_text()).items()
            if k != "sha256"}
    spec["sha256"] = "0" * 64  # stale: replaced by the file's
    write_spec(folder, spec)
    written = json.loads((folder / "model.json").read_text())
    assert written == {**spec, "sha256": sha256(folder / "model.onnx")}
    # ModelSpec.save goes through it too
    ModelSpec(**{**spec, "class_names": tuple(spec["class_names"])}).save(tmp_path / "copy")
    assert "sha256" not in json.loads((tmp_path / "copy" / "model.json").read_text())  # no weights


def test_hash_is_cached_by_path_mtime_and_size(tmp_path):
    import os

    from napari_hemato.core.spec import _sha256

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = file_sha256(path)
    hits = _sha256.cache_info().hits
    assert file_sha256(path) == first and _sha256.cache_info().hits == hits + 1
    path.write_bytes(b"b" * 1000)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_sha256(path) == sha256(path) != first


RUNTIME = Path(napari_hemato.__file__).parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "torch"}


def test_runtime_code_loads_nothing_through_pickle():
    """No pickle-based loader outside train/ (the [train] extra); np.load says allow_pickle=False."""
    found = []
    for path in sorted(RUNTIME.rglob("*.py")):
        if "train" in path.relative_to(RUNTIME).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(RUNTIME)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{where} imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name in ("read_pickle", "loads") and getattr(node.func.value, "id", "") in (
                        "pd", "pickle"):
                    found.append(f"{where} calls {name}")
                if name == "load" and getattr(node.func.value, "id", "") in ("np", "numpy"):
                    safe = any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant)
                               and k.value.value is False for k in node.keywords)
                    if not safe:
                        found.append(f"{where} np.load without allow_pickle=False")
    assert not found, found
