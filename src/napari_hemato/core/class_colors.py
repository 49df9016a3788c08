"""One colour per class, the same in every layer, legend and export."""

from __future__ import annotations

import hashlib

CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    # smear cell types
    "RBC": (230, 80, 80), "WBC": (140, 90, 220), "Platelets": (240, 200, 40),
    # WBC subtypes (neutrophil lineage in blues/greens, others distinct)
    "SNE": (60, 130, 240), "BNE": (90, 200, 250), "EO": (250, 120, 40), "BA": (120, 60, 160),
    "LY": (60, 200, 90), "MO": (200, 160, 90), "MMY": (0, 160, 160), "MY": (0, 110, 110),
    "PMY": (170, 220, 60), "ERB": (220, 40, 120), "PLT": (250, 230, 110),
    # H&E
    "nucleus": (40, 220, 220), "mitosis": (255, 0, 255), "normal": (255, 0, 255),
    "atypical": (255, 140, 0),
    # review states
    "unassigned": (160, 160, 160), "rejected": (80, 80, 80),
}


def class_color(name: str) -> tuple[int, int, int]:
    """RGB 0-255 for a class; unknown names get a stable colour from their hash."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    digest = hashlib.sha1(str(name).encode()).digest()
    return (64 + digest[0] % 192, 64 + digest[1] % 192, 64 + digest[2] % 192)


def class_color_float(name: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    r, g, b = class_color(name)
    return (r / 255, g / 255, b / 255, alpha)
