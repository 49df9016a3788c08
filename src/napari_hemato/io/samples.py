"""npe2 sample data: real images bundled with the package (see samples/ATTRIBUTION.md)."""

from __future__ import annotations

from napari_hemato.io.reader import slide_to_layer_data
from napari_hemato.samples import sample_path


def _sample(name: str, mpp: float | None = None) -> list[tuple]:
    from napari_hemato.core.slide import open_slide

    return [slide_to_layer_data(open_slide(sample_path(name), mpp=mpp))]


def he_slide() -> list[tuple]:
    """Aperio SVS H&E region, 0.499 µm/px (OpenSlide CMU-1-Small-Region, CC0)."""
    return _sample("he_slide")


def smear_field() -> list[tuple]:
    """Peripheral blood smear field (cbc sample, MIT-style licence); pixel size unknown."""
    return _sample("smear_field")
