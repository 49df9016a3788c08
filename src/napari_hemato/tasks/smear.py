"""Blood smears: red cells, white cells and platelets, then the WBC differential.

- **Pixel size.** A smear field that states none is measured on its red cells
  (the ruler every smear carries, :mod:`napari_hemato.core.smear_scale`); an estimate
  that agrees with the model's training images keeps their value.
- **Second stage.** Every white cell the detector found is classified into the 11
  PBC classes (:mod:`napari_hemato.core.cells`); the detector's call stays in ``cell_type``.
- **Summary.** The WBC differential against the 100-cell target; RBC and platelet counts.
- **Review.** The classifier's class activation map for a white cell.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import pandas as pd

from napari_hemato.core.classes import ClassHierarchy
from napari_hemato.core.errors import SlideError
from napari_hemato.models.cell_classifier import CLASS_NAMES
from napari_hemato.tasks.base import Task

log = logging.getLogger(__name__)

#: a red-cell estimate within this ratio of the spec's ``assumed_input_mpp`` confirms it: the
#: estimate's p10-p90 spread on held-out BCCD fields (0.86-1.09 of the truth, see the smear card)
AGREEMENT = (0.87, 1.15)
WBC = "WBC"


def differential(table: pd.DataFrame, *, target: int = 100) -> dict:
    """WBC differential from a smear table (``class`` holds the WBC subtype; on a scan only
    the cells ``in_reading_zone``, the others counted as ``outside_reading_zone``).

    Examples
    --------
    >>> t = pd.DataFrame({"class": ["SNE", "SNE", "LY", "RBC"], "cell_type": ["WBC", "WBC", "WBC", "RBC"]})
    >>> differential(t)["percent"]["SNE"]
    66.7
    """
    outside = 0
    if "in_reading_zone" in table:  # a scan: only the cells in its reading zone count
        inside = table["in_reading_zone"].astype(bool)
        outside, table = int((~inside).sum()), table[inside]
    classes = table["class"]
    codes, names = pd.factorize(table["cell_type"] if "cell_type" in table else classes)
    types = dict(zip(map(str, names), np.bincount(codes[codes >= 0], minlength=len(names)),
                     strict=True))
    # a platelet seen by the detector is not a WBC-classifier PLT: only WBC-typed rows count
    if "cell_type" in table:
        wbc_code = [k for k, name in enumerate(names) if str(name) == "WBC"]
        classes = classes[codes == wbc_code[0]] if wbc_code else classes.iloc[:0]
    found = classes.astype(str).value_counts()
    counts = {c: int(found.get(c, 0)) for c in CLASS_NAMES}
    total = int(sum(counts.values()))
    return {
        "wbc_total": total,
        "target": target,
        "target_reached": total >= target,
        "counts": counts,
        "percent": {c: round(100.0 * n / total, 1) if total else 0.0 for c, n in counts.items()},
        "rbc": int(types.get("RBC", 0)),
        "platelets": int(types.get("Platelets", 0)),
        "outside_reading_zone": outside,
    }


@functools.lru_cache(maxsize=2)
def _cam_classifier(model_dir: str | None):
    from napari_hemato.models.cell_classifier import CellClassifier

    return CellClassifier(model_dir)


def with_red_cell_mpp(slide, predictor, *, roi=None):
    """``slide`` with the pixel size its red cells show (smear fields that state none).

    Returns ``slide`` itself, unchanged, when the model has no red-cell reference or
    the field has too few red cells; the engine then assumes the model's
    ``assumed_input_mpp``.
    """
    from napari_hemato.core.smear_scale import estimate_smear_mpp

    try:
        est = estimate_smear_mpp(predictor, slide, roi=roi)
    except SlideError as err:
        log.info("%s: %s", slide.path, err)
        return slide
    if est.mpp is None:
        log.warning("%s: too few red cells to measure the pixel size (%d found)", slide.path,
                    est.n_cells)
        return slide
    return with_measured_mpp(slide, est.mpp, predictor, f"{est.n_cells} red cells")


def with_measured_mpp(slide, measured: float, predictor, what: str):
    """``slide`` with a pixel size measured on red cells (``what`` says on which, for the log):
    the model's training value when the two agree (:data:`AGREEMENT`; it is known more
    precisely), else the measurement."""
    assumed = predictor.spec.assumed_input_mpp
    if assumed and AGREEMENT[0] <= measured / assumed <= AGREEMENT[1]:
        log.warning("%s: pixel size unknown; its red cells (%.4f µm/px on %s) agree with the "
                    "model's training images: %.4f µm/px used", slide.path, measured, what, assumed)
        mpp = assumed
    else:
        log.warning("%s: pixel size unknown; %.4f µm/px measured on %s (pass the real one to be "
                    "sure)", slide.path, measured, what)
        mpp = measured
    return dataclasses.replace(slide, mpp=mpp, mpp_source="red-cells")


#: fields read for a folder's pooled pixel size, and readings needed (the quartile spread
#: allowed is classify-cells': :data:`napari_hemato.models.window_scale.POOL_SPREAD`)
POOL_FIELDS, POOL_MIN_OK = 8, 5


def pooled_field_mpp(paths, predictor) -> dict[tuple[int, int], float]:
    """One measured µm/px per image size of a folder of smear fields that state none.

    For each size with at least :data:`POOL_FIELDS` fields, that many evenly spread fields
    are measured on their red cells (:func:`~napari_hemato.core.smear_scale.estimate_smear_mpp`);
    the median is the size's pixel size when :data:`POOL_MIN_OK` readings succeed and their
    quartile spread is at most classify-cells' (:func:`~napari_hemato.models.window_scale.
    pool_readings`). Fields of one camera share a pixel size,
    and reading it once instead of per field is most of the per-field cost
    (``analyze FOLDER``). Sizes not pooled are measured field by field as before.
    """
    from napari_hemato.core.colour_match import for_image
    from napari_hemato.core.slide import open_slide
    from napari_hemato.core.smear_scale import estimate_smear_mpp
    from napari_hemato.models.window_scale import pool_readings, pool_sample

    by_size: dict[tuple[int, int], list] = {}
    for path in paths:
        try:
            with open_slide(path) as slide:
                if slide.mpp is None:
                    by_size.setdefault(tuple(slide.shape[:2]), []).append(path)
        except SlideError:
            continue  # the run reports it
    pooled = {}
    for size, group in by_size.items():
        if len(group) < POOL_FIELDS:
            continue
        readings = []
        for k in pool_sample(len(group), POOL_FIELDS):
            with open_slide(group[k]) as slide:
                readings.append(estimate_smear_mpp(for_image(predictor, slide), slide).mpp)
        reading = pool_readings(readings, len(readings), min_ok=POOL_MIN_OK)
        if reading.mpp is not None:
            pooled[size] = reading.mpp
        log.info("fields of %d x %d px: red cells read on %d of %d sampled fields (quartile spread "
                 "%.3f): %s", size[1], size[0], reading.n_ok, reading.n_read, reading.spread,
                 f"{reading.mpp:.4f} µm/px used for all {len(group)}" if reading.mpp is not None
                 else "measured per field")
    return pooled


def classifier_field_mpp(slide, table, classifier) -> float | None:
    """What a red-cell-scale classifier's ruler reads on a whole field that states no pixel
    size, its white cells left out (as :meth:`~napari_hemato.models.cell_classifier.
    CellClassifier.classify_in_image` reads one); None for larger images (each white cell's
    neighbourhood is read) and other classifiers.

    On the 64 labelled white cells of 72 held-out BCCD fields the bundled classifier's coarse
    group was right for 63 with this reading (read at the white cells' working resolution,
    as fast as before) and 53 with a reading around each cell."""
    from napari_hemato.core.cells import cell_types, equivalent_diameter
    from napari_hemato.core.slide import to_rgb8
    from napari_hemato.models.window_scale import WHOLE_FIELD_PX, field_mpp_for_cells

    scale = getattr(classifier, "scale", None)
    h, w = slide.shape[:2]
    if scale is None or scale.mode != "red-cell" or h * w > WHOLE_FIELD_PX:
        return None
    wbc = table[cell_types(table) == WBC]  # the rows classify_wbcs classifies
    if wbc.empty:
        return None  # nothing to classify
    return field_mpp_for_cells(scale, to_rgb8(slide.read_region(0, 0, 0, h, w)),
                               wbc[["y", "x"]].to_numpy(float),
                               equivalent_diameter(wbc["area_px"].to_numpy(float)), at_cell_scale=True)


def add_wbc_subtypes(result, slide, classifier) -> None:
    """Classify the white cells of a finished smear run; rewrites its table.

    A field that states no pixel size is read by the classifier's own ruler, once for the
    whole field (:func:`classifier_field_mpp`; larger images: around each white cell)."""
    from napari_hemato.core.cells import classify_wbcs, stated_mpp

    table = result.table()
    mpp = classifier_field_mpp(slide, table, classifier) if stated_mpp(slide) is None else None
    table = classify_wbcs(table, slide, classifier, mpp=mpp)
    names = list(result.spec.class_names) + list(classifier.spec.class_names)
    result.store.write_table([table], list(table.columns))
    cfg = result.store.config
    result.store.set_status(
        result.status,
        model={**cfg["model"], "class_names": names},
        classifier={"name": classifier.spec.name, "version": classifier.spec.version},
    )


def mark_reading_zone(result) -> None:
    """Add ``in_reading_zone`` (the centre inside the run's reading zone) to a scan's table.

    Tiles touching the zone are read whole, so cells of the thick area or the feathered edge
    next to it are found too; they stay in the table (to look at) but the differential
    counts only the cells in the zone."""
    table = result.table()
    zone = result.tissue
    rows = np.clip((table["y"].to_numpy() // zone.scale[0]).astype(int), 0, zone.shape[0] - 1)
    cols = np.clip((table["x"].to_numpy() // zone.scale[1]).astype(int), 0, zone.shape[1] - 1)
    table["in_reading_zone"] = zone.mask[rows, cols]
    result.store.write_table([table], list(table.columns))


#: crop side / white-cell size of the corrections exported for ``finetune wbc``
CORRECTION_CONTEXT = 4.0


class SmearTask(Task):
    name = "smear"
    title = "Blood smear cells (RBC / WBC / platelets) and the WBC differential"
    finetune_kind = "wbc"  # corrections of white-cell classes refit the WBC classifier
    finetune_choices = {"wbc": "white-cell classes (WBC classifier)",
                        "smear": "cells: outlines and types (cell detector)"}
    stage_model = ("classifier", "WBC classifier")
    # a camera field is read whole; a larger scan only in its reading zone (the monolayer)
    tissue_default = "auto"

    def export_corrections(self, annotations, folder, kind=None):
        """``wbc`` (default): the crops export (``manifest.csv``), whose reviewed white cells
        ``finetune wbc`` keeps; ``smear``: the field's reviewed cells as a label TIFF
        (:meth:`Task.export_reviewed_masks`), what ``finetune smear`` reads.

        Crops span :data:`CORRECTION_CONTEXT` cell diameters: enough red cells around each
        white cell for a red-cell-scale classifier's ruler to read the pixel size at
        fine-tuning (a self-scale one cuts its window from the centre either way)."""
        from napari_hemato.core.export.crops import export_crops

        if kind == "smear":
            return self.export_reviewed_masks(annotations, folder)

        return export_crops(annotations, folder, context=CORRECTION_CONTEXT, overwrite=True)

    def suits(self, info) -> bool:
        """A smear field: a single-level colour camera image (JPEG, PNG, BMP) stating no pixel
        size; slides (pyramids, TIFF/SVS with a pixel size) are offered the H&E tasks."""
        path = str(info.get("path") or "").lower()
        return (not info.get("mpp") and len(info.get("levels") or [None]) == 1
                and int(info.get("channels") or 3) in (3, 4)
                and path.endswith((".jpg", ".jpeg", ".png", ".bmp")))

    def load_stages(self, *, classifier=None, providers=None, threads=None, **options) -> dict:
        """``{"wbc": CellClassifier}``: ``classifier`` a folder, None for the bundled one,
        ``False`` for none (also when no WBC model is bundled)."""
        from napari_hemato.models.registry import bundled_models

        if classifier is False or (classifier is None and "wbc" not in bundled_models()):
            return {}
        from napari_hemato.models.cell_classifier import CellClassifier

        return {"wbc": CellClassifier(classifier, providers=providers, threads=threads)}

    def prepare_slide(self, slide, predictor, *, roi=None, estimate_mpp=True, pooled_mpp=None):
        if estimate_mpp and slide.mpp is None:
            if pooled_mpp:
                return with_measured_mpp(slide, pooled_mpp, predictor,
                                         f"{POOL_FIELDS} sampled fields of its size")
            return with_red_cell_mpp(slide, predictor, roi=roi)
        return slide

    def pool_pixel_sizes(self, paths, predictor) -> dict[tuple[int, int], float]:
        return pooled_field_mpp(paths, predictor)

    def find_tissue(self, slide, *, roi=None):
        from napari_hemato.core.reading_zone import detect_reading_zone

        return detect_reading_zone(slide, roi=roi)

    def finish(self, result, slide, stages) -> None:
        if result.tissue is not None:
            mark_reading_zone(result)
        if "wbc" in stages:
            add_wbc_subtypes(result, slide, stages["wbc"])

    def summary(self, table, *, area_mm2=None, mpp=None, region=None) -> dict:
        return {"differential": differential(table)} if "cell_type" in table else {}

    def summary_lines(self, summary) -> list[str]:
        if "differential" not in summary:
            return []
        d = summary["differential"]
        lines = [f"WBC differential: {d['wbc_total']} cells (a manual differential counts "
                 f"{d['target']})"]
        lines += [f"  {k:<6} {n:>5}  {d['percent'][k]:5.1f} %" for k, n in d["counts"].items() if n]
        if d.get("outside_reading_zone"):
            lines.append(f"  ({d['outside_reading_zone']} cells outside the reading zone, not counted)")
        lines.append(f"RBC {d['rbc']}, platelets {d['platelets']}")
        return lines

    def claims(self, annotations) -> bool:
        return "cell_type" in annotations.table

    def hierarchy(self, annotations) -> ClassHierarchy:
        """Cell types (the detector's RBC, WBC, Platelets) -> the WBC classifier's 11
        subtypes; the type lives in ``cell_type``. The classifier's PLT and ERB are white-cell
        subtypes (what the classifier calls a cell the detector saw as a WBC), not types."""
        names = [str(c) for c in annotations.class_names]
        types = tuple(c for c in names if c not in CLASS_NAMES) or ("RBC", WBC, "Platelets")
        subtypes = tuple(c for c in CLASS_NAMES if c in names) or CLASS_NAMES
        if WBC not in types:
            return ClassHierarchy.flat(names)
        return ClassHierarchy(types, {WBC: subtypes}, type_column="cell_type")

    def has_cam(self, row) -> bool:
        subtype_probs = [k for k in row.index if k.startswith("prob_")]
        return (str(row.get("cell_type", "")) == "WBC" and len(subtype_probs) > 3
                and np.isfinite(float(row.get("confidence", np.nan))))

    def cam(self, annotations, row, *, model_dir: str | None = None):
        """``(crop, cam)`` for the white cell in ``row``: the crop the classifier saw and
        its class activation map in [0, 1] (bundled WBC model unless ``model_dir``)."""
        from napari_hemato.core.cells import cell_crop, stated_mpp, window_context
        from napari_hemato.core.slide import open_slide

        if not annotations.image_path:
            raise ValueError("the annotation set does not say which image it came from")
        classifier = _cam_classifier(model_dir)
        with open_slide(annotations.image_path, mpp=annotations.mpp) as slide:
            mpp = stated_mpp(slide)
            context = window_context(classifier.spec.preprocess, row["area_px"], mpp)
            crop, diameter = cell_crop(slide, row["y"], row["x"], row["area_px"], context)
        _, cams = classifier.classify_crops([crop], [diameter], mpp=mpp)
        cam = np.asarray(cams[0], np.float32)
        if cam.shape != crop.shape[:2]:
            from skimage.transform import resize

            cam = resize(cam, crop.shape[:2], order=1)
        return crop, cam


TASK = SmearTask()
