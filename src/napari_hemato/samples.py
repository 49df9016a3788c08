"""Paths of the sample images bundled with the package (see samples/ATTRIBUTION.md)."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"


def sample_path(name: str) -> Path:
    """``"he_slide"`` (real Aperio SVS, 0.499 µm/px) or ``"smear_field"`` (JPEG)."""
    files = {"he_slide": "cmu_small_region.svs", "smear_field": "smear_field_cbc.jpg"}
    if name not in files:
        raise KeyError(f"unknown sample {name!r}; choose from {sorted(files)}")
    return SAMPLES / files[name]
