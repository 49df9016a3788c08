"""The model card of a fine-tuned mitosis detector."""

from __future__ import annotations


def _f(v) -> str:
    return "–" if v is None or v != v else f"{v:.3f}"


def card(spec, corrections: dict, metrics: dict, stamp: str, minutes: float, max_drop: float) -> str:
    """Markdown: what was corrected, the metrics before/after, the settings tried."""
    b, a, c = metrics["before"], metrics["after"], metrics["chosen"]
    per_image = "\n".join(
        f"- `{row['csv']}`: " + (", ".join(f"{k} {v}" for k, v in row.items() if k != "csv") or "nothing corrected")
        for row in corrections["per_image"])
    rows = "\n".join(f"| {t['l2']:g} | {t['share']:.1f} | {_f(t['heldout_agreement'])} | "
                     f"{_f(t['reference_recall'])} |" for t in metrics["settings_tried"])
    note = f"\n**Note.** {a['note']}\n" if a.get("note") else ""
    return f"""# Model card: `{spec.name}-finetuned` (from `{spec.name}` {spec.version})

**Research use only**, like its base model (see the base model's card for its data,
training and intended use). Fine-tuned on {stamp} in {minutes:.1f} min by
`napari-hemato finetune mitosis`: the heatmap channel of the last 1×1 convolution is refit
on the model's own features (the trunk and the normal/atypical probabilities are unchanged).
A person still confirms every figure.

## Corrections used
{corrections['points']} points ({corrections['figures']} figures kept or added,
{corrections['rejections']} rejected) from {len(corrections['sources'])} export(s):

{per_image}

Held out to choose the settings: {corrections['heldout']}.

## Metrics (threshold {metrics['threshold']:g})
| | before | after |
|---|---|---|
| held-out figures still detected | {_f(b['heldout_figures_kept'])} | {_f(a['heldout_figures_kept_of_the_split_fit'])} (fit without them) |
| held-out rejections no longer detected | {_f(b['heldout_rejections_held'])} | {_f(a['heldout_rejections_held_of_the_split_fit'])} (fit without them) |
| all corrections: figures detected | {_f(b['corrections_figures_kept'])} | {_f(a['corrections_figures_kept'])} |
| all corrections: rejections no longer detected | {_f(b['corrections_rejections_held'])} | {_f(a['corrections_rejections_held'])} |
| reference recall ({metrics['reference']}) | {_f(b['reference_recall'])} | {_f(a['reference_recall'])} |
| reference hard negatives above the threshold | {_f(b['reference_hard_negatives_above'])} | {_f(a['reference_hard_negatives_above'])} |
{note}
The written layer is refit on every correction with the chosen setting (anchor l2
{'none: unchanged' if c['l2'] is None else format(c['l2'], 'g')}, corrections' share {c['share']:.1f}); settings tried (a setting may drop the
reference recall by at most {max_drop:.0%}):

| anchor l2 | corrections' share | held-out agreement | reference recall |
|---|---|---|---|
{rows}

"Detected" is judged on the model's own features around each point (the best pixel within
2 µm of a figure, within 4 µm of a rejection); with few corrections these numbers rest on a
handful of points: read them as a check, not as a measurement of the new lab's accuracy.
"""
