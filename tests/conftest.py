"""Shared fixtures: paths to ../shared/data and tiny models built in tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests using it skip cleanly when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"needs real data in {SHARED_DATA} (absent on this machine)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def svs_path(shared_data: Path) -> Path:
    return shared_data / "slides" / "cmu_small_region.svs"


@pytest.fixture(autouse=True)
def _torch_needs_a_qt_free_process(request):
    """torch's lazy ``import triton`` segfaults once a Qt application (napari viewer) ran.

    ``scripts/test.sh`` runs the training tests (``tests/test_train_*.py``) in a pytest
    process of their own; in a mixed session they skip instead of crashing it.
    """
    import sys

    widgets = sys.modules.get("PyQt6.QtWidgets")
    app_running = widgets is not None and widgets.QApplication.instance() is not None
    if request.node.path.name.startswith("test_train_") and app_running:
        pytest.skip("torch training tests run in their own process (scripts/test.sh): "
                    "importing triton after a Qt application started crashes")
