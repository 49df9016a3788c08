"""Tissue detection on the real SVS and on a blank 40960² pyramid; prints JSON.

Usage: PYTHONPATH=src python benchmarks/bench_tissue.py [--skip-e2e] [--skip-blank]
Results go to benchmarks/results/tissue.json.

Reference mask of the SVS (../shared/data/slides/cmu_small_region.svs): made by careful
manual thresholding, not by the detector: level 0 averaged to 2 µm/px, a pixel is tissue
where its darkest channel is below 228 (glass is 238-246 there, chosen by looking at the
thumbnail and its histogram), the teal tissue-marking dye excluded by hand-picked hue
(150-200°) and saturation (> 0.2), a closing of 6 µm, holes under 0.01 mm² filled and
parts under 0.002 mm² dropped; the overlay (reference_overlay.png) was inspected. It is
compared with the auto mask at the auto mask's resolution (a mask pixel is reference
tissue where most of its 2 µm pixels are).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT.parent / "shared" / "data" / "slides" / "cmu_small_region.svs"
RESULTS = ROOT / "benchmarks" / "results"


def reference_mask(slide) -> tuple[np.ndarray, float]:
    from napari_hemato.core.slide import to_rgb8
    from napari_hemato.core.tissue import colour_features

    img = to_rgb8(slide.read_region(0, 0, 0, *slide.shape)).astype(np.float32)  # 20 MB slide
    f = 4
    h, w = img.shape[0] // f, img.shape[1] // f
    small = img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))
    sat, _, hue, _ = colour_features(small)
    ref = small.min(axis=-1) < 228
    ref &= ~((hue >= 150) & (hue < 200) & (sat > 0.2))
    yy, xx = np.mgrid[-3:4, -3:4]
    ref = ndi.binary_closing(np.pad(ref, 3), structure=yy**2 + xx**2 <= 9)[3:-3, 3:-3]
    px_um2 = (slide.mpp * f) ** 2
    holes, n = ndi.label(~ref)
    sizes = np.bincount(holes.ravel())
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes < 10_000 / px_um2
    fill[0] = False
    fill[edge] = False
    ref |= fill[holes]
    parts, n = ndi.label(ref)
    keep = np.bincount(parts.ravel()) >= 2_000 / px_um2
    keep[0] = False
    ref = keep[parts]
    overlay = small.astype(np.uint8)
    overlay[ref ^ ndi.binary_erosion(ref)] = (0, 160, 0)
    from PIL import Image

    Image.fromarray(overlay).save(RESULTS / "reference_overlay.png")
    return ref, float(f)


def svs_mask_numbers() -> dict:
    from napari_hemato.core.geometry import WorkGrid
    from napari_hemato.core.slide import open_slide
    from napari_hemato.core.spec import load_spec
    from napari_hemato.core.tiling import plan_tiles
    from napari_hemato.core.tissue import detect_tissue, tiles_off_tissue
    from napari_hemato.models.registry import resolve_model

    with open_slide(SVS) as slide:
        t = time.perf_counter()
        auto = detect_tissue(slide)
        seconds = time.perf_counter() - t
        ref, f = reference_mask(slide)
        spec = load_spec(resolve_model("nuclei"))
        grid = WorkGrid.for_model(slide, spec.mpp)
        tiles = {}
        for tile in (spec.tile, 256):
            plan = plan_tiles(grid.shape, tile=tile, halo=spec.halo, size_divisor=spec.size_divisor)
            tiles[str(tile)] = {"tiles": len(plan),
                                "skipped": len(tiles_off_tissue(plan, grid, auto))}
    sy, sx = auto.scale
    k = int(round(sy / f))
    h, w = auto.shape
    pad = np.zeros((h * k, w * k), bool)
    pad[: min(ref.shape[0], h * k), : min(ref.shape[1], w * k)] = ref[: h * k, : w * k]
    ref_low = pad.reshape(h, k, w, k).mean(axis=(1, 3)) > 0.5
    a = auto.mask
    iou = float((a & ref_low).sum() / (a | ref_low).sum())
    return {"slide": SVS.name, "auto_mask_shape": list(auto.shape),
            "auto_mask_mpp": round(auto.mpp, 3), "detect_seconds": round(seconds, 3),
            "auto_area_mm2": round(auto.area_mm2, 4),
            "reference_area_mm2": round(float(ref.sum()) * (slide.mpp * f) ** 2 / 1e6, 4),
            "iou_auto_vs_reference": round(iou, 4), "tiles": tiles}


def e2e(tissue: str, out: Path, **kw) -> dict:
    from napari_hemato.api import analyze

    t = time.perf_counter()
    result = analyze(SVS, task="nuclei", tissue=tissue, out=out, overwrite=True, threads=2, **kw)
    seconds = time.perf_counter() - t
    return {"tissue": tissue, "seconds": round(seconds, 2), "tiles": len(result.plan),
            "tiles_off_tissue": result.n_off_tissue, "nuclei": len(result.table()),
            "table": result.table()}


def blank_slide(path: Path, side: int = 40960) -> Path:
    """A blank (uniform glass) pyramidal TIFF, 0.25 µm/px, levels 4× apart, zlib tiles."""
    import tifffile

    tile = np.full((512, 512, 3), 242, np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, n in enumerate((side, side // 4, side // 16, side // 64)):
            count = math.ceil(n / 512) ** 2
            tw.write((tile for _ in range(count)), shape=(n, n, 3), dtype=np.uint8,
                     tile=(512, 512), photometric="rgb", compression="zlib",
                     subfiletype=0 if k == 0 else 1, subifds=3 if k == 0 else None,
                     resolution=(1e4 / 0.25 / 4**k, 1e4 / 0.25 / 4**k),
                     resolutionunit="CENTIMETER")
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-blank", action="store_true")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-tissue-"))
    out = {"svs": svs_mask_numbers()}
    if not args.skip_e2e:
        e2e("none", tmp / "warm.zarr", roi=(0, 0, 512, 512))  # load the model once, untimed
        out["e2e_nuclei"] = {}
        for tile in (None, 256):  # the model's tile (768: none off tissue here), and 256
            runs = [e2e(t, tmp / f"{t}{tile}.zarr", tile=tile) for t in ("none", "auto")]
            none_t, auto_t = runs[0].pop("table"), runs[1].pop("table")
            # the auto run's nuclei (ids = tile * stride + k) are the full run's, same place
            both = none_t.merge(auto_t, on="id", suffixes=("", "_auto"))
            same = int(((both["y"] == both["y_auto"]) & (both["x"] == both["x_auto"])).sum())
            out["e2e_nuclei"][str(tile or "model")] = {
                "runs": runs, "auto_nuclei_identical_in_full_run": same,
                "full_run_nuclei_in_skipped_tiles": int(len(none_t) - len(both))}
    if not args.skip_blank:
        t = time.perf_counter()
        path = blank_slide(tmp / "blank.tif")
        write_s = time.perf_counter() - t
        from napari_hemato.cli import main as cli

        t = time.perf_counter()
        code = cli(["analyze", str(path), "--task", "nuclei", "--tissue", "auto",
                    "--out", str(tmp / "blank.zarr"), "--threads", "2", "--json"])
        out["blank_40960"] = {"write_seconds": round(write_s, 1), "exit": code,
                              "analyze_seconds": round(time.perf_counter() - t, 2)}
    (RESULTS / "tissue.json").write_text(json.dumps(out, indent=2) + "\n")
    import sys

    sys.stdout.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
