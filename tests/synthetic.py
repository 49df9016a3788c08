"""Synthetic slides: dark disks (cells/nuclei) on a bright background."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def disk_image(shape=(600, 800), n=120, radius=(4, 9), seed=0) -> np.ndarray:
    """RGB uint8 image of non-touching dark disks on white; returns the image."""
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), 240, np.uint8)
    yy, xx = np.indices(shape)
    centres = []
    for _ in range(n * 20):
        if len(centres) == n:
            break
        r = rng.uniform(*radius)
        c = rng.uniform([r, r], [shape[0] - r, shape[1] - r])
        if all(np.hypot(*(c - d)) > r + rr + 3 for d, rr in centres):
            centres.append((c, r))
    for (cy, cx), r in centres:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[inside] = rng.integers(30, 90, size=3)
    return img


def write_tiff(path: Path, image: np.ndarray, *, mpp: float | None = None) -> Path:
    """Plain TIFF, with resolution tags in µm when ``mpp`` is given."""
    import tifffile

    kwargs = {}
    if mpp is not None:
        kwargs = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, image, photometric="rgb", **kwargs)
    return path


def fake_dsb_tissue(root: Path, n: int = 10) -> Path:
    """A DSB-layout folder: ``<id>.png`` (purple tissue) + ``<id>_label.tif`` (nuclei)."""
    import tifffile
    from PIL import Image

    folder = root / "nuclei_dsb2018_brightfield"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :320]
    for i in range(n):
        img = np.full((256, 320, 3), (200, 180, 215), np.uint8)
        lab = np.zeros((256, 320), np.uint16)
        r = 4 + i  # nuclei of different sizes: different pixel sizes
        for k, (y, x) in enumerate(rng.integers(20, 236, (12, 2))):
            disc = (yy - y) ** 2 + (xx - x) ** 2 < r * r
            img[disc] = (90, 60, 150)
            lab[disc] = k + 1
        Image.fromarray(img).save(folder / f"{i:02d}{'ab' * 8}.png")
        tifffile.imwrite(folder / f"{i:02d}{'ab' * 8}_label.tif", lab)
    return root
