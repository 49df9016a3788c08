"""Packaging contracts: cheap imports, a valid npe2 manifest, importable commands."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import napari_hemato

MANIFEST = Path(napari_hemato.__file__).parent / "napari.yaml"


def test_core_imports_leave_qt_torch_onnxruntime_out():
    code = (
        "import sys\n"
        "import napari_hemato, napari_hemato.core.engine, napari_hemato.core.slide,"
        " napari_hemato.api, napari_hemato.cli, napari_hemato.models.onnx_backend\n"
        "bad = [m for m in ('qtpy', 'PyQt6', 'torch', 'onnxruntime', 'napari') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_validates_and_python_names_import():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    raw = yaml.safe_load(MANIFEST.read_text())
    for command in raw["contributions"]["commands"]:
        module, _, attr = command["python_name"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_manifest_is_registered_as_entry_point():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-hemato"]
    assert eps and eps[0].value == "napari_hemato:napari.yaml"


def test_bundled_samples_exist_with_attribution():
    from napari_hemato.samples import SAMPLES, sample_path

    assert sample_path("he_slide").stat().st_size > 1_000_000
    assert sample_path("smear_field").exists()
    text = (SAMPLES / "ATTRIBUTION.md").read_text()
    assert "CC0" in text and "MIT" in text
    shipped = {p.name for p in SAMPLES.iterdir()}
    assert not any("MIDOG" in n or "TUPAC" in n or n.startswith("image0") for n in shipped)
