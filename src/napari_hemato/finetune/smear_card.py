"""The model card of a fine-tuned smear cell detector."""

from __future__ import annotations

from napari_hemato.finetune.mitosis_card import _f


def card(spec, corrections: dict, metrics: dict, stamp: str, minutes: float, max_drop: float) -> str:
    """Markdown: what was corrected, the metrics before/after, the settings tried."""
    b, a, c = metrics["before"], metrics["after"], metrics["chosen"]
    names = list(spec.class_names)
    ref_keys = [k[len("reference_"):-len("_f1")] for k in b if k.startswith("reference_") and k.endswith("_f1")]
    per_region = "\n".join(f"- `{r['key']}`: {r['cells']} cells, {r['shape'][0]}×{r['shape'][1]} px "
                           "on the model grid" for r in corrections["per_region"])
    counts = ", ".join(f"{n} {k}" for k, n in corrections["per_class"].items())
    held_rows = "\n".join(f"| held-out {k} F1 / PQ (mask IoU ≥ 0.5) | {_f(b.get(f'heldout_{k}_f1'))} / "
                          f"{_f(b.get(f'heldout_{k}_pq'))} | {_f(a.get(f'heldout_{k}_f1_of_the_split_fit'))} / "
                          f"{_f(a.get(f'heldout_{k}_pq_of_the_split_fit'))} |" for k in names)
    ref_rows = "\n".join(f"| reference {k} F1 (box IoU ≥ 0.5) | {_f(b.get(f'reference_{k}_f1'))} | "
                         f"{_f(a.get(f'reference_{k}_f1'))} |" for k in ref_keys)
    rows = "\n".join(f"| {t['l2']:g} | {t['share']:.1f} | {_f(t['heldout_score'])} | "
                     f"{_f(t['reference_objective'])} |" for t in metrics["settings_tried"])
    note = f"\n**Note.** {a['note']}\n" if a.get("note") else ""
    return f"""# Model card: `{spec.name}-finetuned` (from `{spec.name}` {spec.version})

**Research use only**, like its base model (see the base model's card for its data,
training and intended use). Fine-tuned on {stamp} in {minutes:.1f} min by
`napari-hemato finetune smear`: the foreground, distance and class channels of the last 1×1
convolution are refit on the model's own features (the rest of the network is unchanged).

## Corrections used
{corrections['cells']} cells ({counts}) in {corrections['regions']} exported field(s), each taken as
reviewed (every cell drawn, every other pixel background):

{per_region}

Held out to choose the settings: {corrections['heldout']}.

## Metrics (post-processing as shipped: threshold {metrics['threshold']:g}, stain rule included)
| | before | after |
|---|---|---|
| held-out mean class PQ | {_f(b['heldout_score'])} | {_f(a['heldout_score_of_the_split_fit'])} (fit without them) |
{held_rows}
| reference objective ({metrics['reference']}) | {_f(b['reference_objective'])} | {_f(a['reference_objective'])} |
{ref_rows}
{note}
The written layer is refit on every correction with the chosen setting (anchor l2
{'none: unchanged' if c['l2'] is None else format(c['l2'], 'g')}, corrections' share {c['share']:.1f}); settings tried (a setting may drop the
reference objective by at most {max_drop:.0%}; a refit is written only when it beats the
shipped layer on the held-out corrections):

| anchor l2 | corrections' share | held-out mean class PQ | reference objective |
|---|---|---|---|
{rows}

The reference objective is the mean of the WBC and platelet F1 and of the RBC F1 counted in
annotated regions (BCCD leaves many red cells unannotated); a user's own held-out fields are
the measure of their lab.
"""
