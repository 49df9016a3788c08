"""Set a mitosis model's detection threshold from its tune slides (no torch; the runtime path).

A pathologist reviews every detection, so a missed figure costs more than a
false one: the threshold is the **highest** at which the model still finds
the target share of figures on the tune slides, with room for chance. Every
crop of the tune slides (``extra.validation_slides.tune``; never trained on,
never in the test numbers) is analysed alone, as ``evaluate mitosis`` does
crop by crop; at each threshold of :data:`evaluate_mitosis.THRESHOLDS` the
recall's 95 % Wilson lower bound is computed, and the highest threshold whose
bound reaches :data:`RECALL_TARGET` is written into ``model.json``
(``postprocess.threshold``), with the rule and the tune numbers in
``extra.threshold``. When no threshold reaches it, the one with the highest
bound is used and the record says the target was missed.

The false detections this leaves on mitosis-poor tissue are measured, not
bounded: ``evaluate mitosis`` reports them per tissue group at this threshold.

``python -m napari_hemato.train.mitosis_threshold MODEL --data ../shared/data``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

from napari_hemato.core.spec import load_spec, write_spec

log = logging.getLogger(__name__)

#: the share of figures the threshold must keep (the issue's target on held-out slides) ...
RECALL_TARGET = 0.95
#: ... as a lower confidence bound at this normal quantile (95 %, two-sided)
Z = 1.96


def wilson_lower(hits: int, n: int, z: float = Z) -> float:
    """Lower bound of the Wilson score interval of ``hits`` successes in ``n`` trials.

    Examples
    --------
    >>> round(wilson_lower(195, 197), 3), round(wilson_lower(192, 197), 3)
    (0.964, 0.942)
    >>> wilson_lower(0, 0)
    0.0
    """
    if n <= 0:
        return 0.0
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def pick_threshold(sweep: list[dict], target: float = RECALL_TARGET, z: float = Z) -> dict:
    """The highest threshold of ``sweep`` (rows with ``threshold``, ``tp``, ``fn``) whose
    recall lower bound reaches ``target``; else the one with the highest bound.

    Examples
    --------
    >>> rows = [{"threshold": t, "tp": tp, "fn": 197 - tp} for t, tp in
    ...         [(0.6, 196), (0.675, 195), (0.7, 192), (0.75, 185)]]
    >>> pick_threshold(rows)["threshold"], pick_threshold(rows)["met"]
    (0.675, True)
    """
    rows = [{**r, "recall_lower_bound": wilson_lower(r["tp"], r["tp"] + r["fn"], z)} for r in sweep]
    ok = [r for r in rows if r["recall_lower_bound"] >= target]
    best = max(ok, key=lambda r: r["threshold"]) if ok else max(
        rows, key=lambda r: (r["recall_lower_bound"], -r["threshold"]))
    return {**best, "met": bool(ok)}


def calibrate_threshold(model_dir, data_dir, *, threads: int | None = 2, target: float = RECALL_TARGET,
                        workdir=None, precision: str = "float") -> dict:
    """Analyse the tune slides' crops and write the threshold (see the module docstring) of
    the ``precision`` network: ``postprocess.threshold`` for the float one,
    ``int8.postprocess.threshold`` for the int8 one.

    Returns the record written to ``extra.threshold`` (``extra.threshold_int8``).
    """
    from napari_hemato.train.evaluate_mitosis import _low_threshold_copy, evaluate_crops

    model_dir = Path(model_dir)
    full = load_spec(model_dir)
    spec = full.for_precision(precision)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="hemato-mitosis-thr-") if own else workdir)
    try:
        low = _low_threshold_copy(full, work / "model_low", precision)
        crops = evaluate_crops(spec, low, data_dir, split="tune", workdir=work, threads=threads)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    if not crops["n_crops"]:
        raise ValueError(f"{data_dir}: none of the model's tune-slide crops found")
    chosen = pick_threshold(crops["sweep"], target)
    record = {
        "value": round(float(chosen["threshold"]), 3),
        "rule": f"highest threshold whose tune-slide crop recall has a 95 % Wilson lower bound >= "
                f"{target:g} (each crop analysed alone, 7.5 um hits)",
        "target_met": chosen["met"],
        "tune_crops": crops["n_crops"], "tune_slides": crops["n_slides"],
        "tune_recall": round(chosen["recall"], 4),
        "tune_recall_lower_bound": round(chosen["recall_lower_bound"], 4),
        "previous": spec.postprocess.get("threshold"),
    }
    d = json.loads((model_dir / "model.json").read_text())
    if precision == "int8":
        d["int8"]["postprocess"] = {**d["int8"].get("postprocess", {}), "threshold": record["value"]}
        d.setdefault("extra", {})["threshold_int8"] = record
    else:
        d["postprocess"]["threshold"] = record["value"]
        d.setdefault("extra", {})["threshold"] = record
    write_spec(model_dir, d)
    log.info("threshold %s -> %s (%s)", record["previous"], record["value"], record["rule"])
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="napari_hemato.train.mitosis_threshold",
                                description=__doc__.split("\n")[0])
    p.add_argument("model", help="mitosis model folder (model.json is updated)")
    p.add_argument("--data", required=True, help="../shared/data (AMi-Br crops)")
    p.add_argument("--target", type=float, default=RECALL_TARGET)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("float", "int8"), default="float",
                   help="whose threshold: the float network's (default) or the int8 one's")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    record = calibrate_threshold(a.model, a.data, threads=a.threads, target=a.target,
                                 precision=a.precision)
    sys.stdout.write(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
