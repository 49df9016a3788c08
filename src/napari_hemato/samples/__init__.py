"""The sample images bundled with the package (files beside this module; ATTRIBUTION.md).

:func:`sample_path` gives their paths; napari's ``File > Open Sample`` entries
(:func:`napari_hemato.io.reader.sample_he_slide`, ``sample_smear_field``) open them.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent


def sample_path(name: str) -> Path:
    """``"he_slide"`` (real Aperio SVS, 0.499 µm/px) or ``"smear_field"`` (JPEG)."""
    files = {"he_slide": "cmu_small_region.svs", "smear_field": "smear_field_cbc.jpg"}
    if name not in files:
        raise KeyError(f"unknown sample {name!r}; choose from {sorted(files)}")
    return SAMPLES / files[name]

