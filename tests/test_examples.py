"""The example scripts run on bundled data (smoke tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from napari_hemato.models.registry import bundled_models

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_nuclei = pytest.mark.skipif("nuclei" not in bundled_models(),
                                  reason="the bundled nuclei model is not in this checkout")


@needs_nuclei
@pytest.mark.parametrize("script", ["analyze_slide.py", "review_and_export.py"])
def test_example_runs(script, tmp_path):
    args = ["--out", str(tmp_path / ("r.zarr" if script == "analyze_slide.py" else "ex"))]
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "objects" in done.stdout or "crops" in done.stdout
