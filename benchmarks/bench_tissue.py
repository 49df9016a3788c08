"""Tissue detection on the real SVS and on a blank 40960² pyramid; a smear scan's reading
zone on a simulated scan and a blank one; prints JSON.

Usage: PYTHONPATH=src python benchmarks/bench_tissue.py [--skip-e2e] [--skip-blank] [--skip-smear]
Results go to benchmarks/results/tissue.json.

The smear scan (no real whole smear scan is at hand) is built of simulated red cells as in
``tests/test_reading_zone.py``: four bands down the smear, glass, the feathered edge (cells
22 µm apart), the monolayer (8.8 µm) and the thick area (4.5 µm, piled), each 1 x 2 mm at
0.25 µm/px (128 MP, pyramidal); the truth is the monolayer band.

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


def smear_scan(path: Path, band_um=(1000, 2000), mpp: float = 0.25) -> tuple[Path, int]:
    """The simulated smear scan (module docstring) as a pyramidal TIFF; returns its path and
    the band height in pixels."""
    import sys

    import tifffile

    sys.path.insert(0, str(ROOT))
    from tests.test_reading_zone import red_cells, to_rgb

    h, w = (round(v / mpp) for v in band_um)
    bands = [np.full((h, w, 3), 0, np.uint8)]
    bands[0][:] = to_rgb(np.zeros((8, 8), np.float32))[0, 0]
    for k, spacing in enumerate((22.0, 8.8, 4.5)):
        bands.append(to_rgb(red_cells((h, w), spacing, mpp, seed=k), seed=k))
    img = np.concatenate(bands, axis=0)
    del bands
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        levels = [img]
        while min(levels[-1].shape[:2]) > 2048:
            a = levels[-1]
            levels.append(a[: a.shape[0] // 4 * 4, : a.shape[1] // 4 * 4].reshape(
                a.shape[0] // 4, 4, a.shape[1] // 4, 4, 3).mean((1, 3)).astype(np.uint8))
        for k, lv in enumerate(levels):
            tw.write(lv, tile=(512, 512), photometric="rgb", compression="zlib",
                     subfiletype=0 if k == 0 else 1, subifds=len(levels) - 1 if k == 0 else None,
                     resolution=(1e4 / mpp / 4**k, 1e4 / mpp / 4**k), resolutionunit="CENTIMETER")
    return path, h


def smear_numbers(tmp: Path) -> dict:
    """The reading zone of the simulated scan against its monolayer band, and of a blank
    40960² scan; the tiles a smear run would skip."""
    from napari_hemato.core.geometry import WorkGrid
    from napari_hemato.core.reading_zone import detect_reading_zone
    from napari_hemato.core.slide import open_slide
    from napari_hemato.core.spec import load_spec
    from napari_hemato.core.tiling import auto_tile, plan_tiles
    from napari_hemato.core.tissue import tiles_off_tissue
    from napari_hemato.models.registry import bundled_models

    t = time.perf_counter()
    path, b = smear_scan(tmp / "smear.tif")
    out = {"write_seconds": round(time.perf_counter() - t, 1)}
    spec = load_spec(bundled_models()["smear"])
    with open_slide(path) as slide:
        t = time.perf_counter()
        zone = detect_reading_zone(slide)
        out["detect_seconds"] = round(time.perf_counter() - t, 2)
        rows = (np.arange(zone.shape[0]) + 0.5) * zone.scale[0]
        truth = np.repeat(((rows >= 2 * b) & (rows < 3 * b))[:, None], zone.shape[1], axis=1)
        inter, union = (zone.mask & truth).sum(), (zone.mask | truth).sum()
        grid = WorkGrid.for_model(slide, spec.mpp)
        tile = auto_tile(grid.shape, tile=spec.tile, halo=spec.halo, size_divisor=spec.size_divisor)
        plan = plan_tiles(grid.shape, tile=tile, halo=spec.halo, size_divisor=spec.size_divisor)
        off = tiles_off_tissue(plan, grid, zone)
        out.update({"megapixels": round(slide.shape[0] * slide.shape[1] / 1e6, 1),
                    "zone_iou_with_monolayer_band": round(float(inter / union), 3),
                    "zone_mm2": round(zone.area_mm2, 3), "monolayer_band_mm2": 2.0,
                    "model_tiles": len(plan), "tiles_off_zone": len(off)})
    path = blank_slide(tmp / "blank_smear.tif")
    with open_slide(path) as slide:
        t = time.perf_counter()
        zone = detect_reading_zone(slide)
        out["blank_40960"] = {"detect_seconds": round(time.perf_counter() - t, 2),
                              "zone_empty": bool(zone.empty)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-blank", action="store_true")
    p.add_argument("--skip-smear", action="store_true")
    p.add_argument("--only-smear", action="store_true", help="the smear part alone, merged "
                   "into the saved results")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-tissue-"))
    if args.only_smear:
        saved = RESULTS / "tissue.json"
        out = json.loads(saved.read_text()) if saved.exists() else {}
        out["smear_scan"] = smear_numbers(tmp)
        saved.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["smear_scan"], indent=2))
        return
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
    if not args.skip_smear:
        out["smear_scan"] = smear_numbers(tmp)
    (RESULTS / "tissue.json").write_text(json.dumps(out, indent=2) + "\n")
    import sys

    sys.stdout.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
