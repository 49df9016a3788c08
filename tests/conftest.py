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
