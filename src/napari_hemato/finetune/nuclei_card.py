"""The model card of a fine-tuned nucleus segmenter."""

from __future__ import annotations

from napari_hemato.finetune.mitosis_card import _f


def card(spec, corrections: dict, metrics: dict, stamp: str, minutes: float, max_drop: float) -> str:
    """Markdown: what was corrected, the metrics before/after, the settings tried."""
    b, a, c = metrics["before"], metrics["after"], metrics["chosen"]
    per_region = "\n".join(f"- `{r['key']}`: {r['nuclei']} nuclei, {r['shape'][0]}×{r['shape'][1]} px "
                           "on the model grid" for r in corrections["per_region"])
    rows = "\n".join(f"| {t['l2']:g} | {t['share']:.1f} | {_f(t['heldout_f1'])} | {_f(t['heldout_aji'])} | "
                     f"{_f(t['reference_f1'])} | {_f(t['reference_aji'])} |" for t in metrics["settings_tried"])
    note = f"\n**Note.** {a['note']}\n" if a.get("note") else ""
    return f"""# Model card: `{spec.name}-finetuned` (from `{spec.name}` {spec.version})

**Research use only**, like its base model (see the base model's card for its data,
training and intended use). Fine-tuned on {stamp} in {minutes:.1f} min by
`napari-hemato finetune nuclei`: the foreground and distance channels of the last 1×1
convolution are refit on the model's own features (the rest of the network is unchanged).

## Corrections used
{corrections['nuclei']} nuclei in {corrections['regions']} exported region(s), each taken as
reviewed (every nucleus drawn, every other pixel background):

{per_region}

Held out to choose the settings: {corrections['heldout']}.

## Metrics (post-processing as shipped: threshold {metrics['threshold']:g})
| | before | after |
|---|---|---|
| held-out F1@0.5 | {_f(b['heldout_f1'])} | {_f(a['heldout_f1_of_the_split_fit'])} (fit without them) |
| held-out AJI | {_f(b['heldout_aji'])} | {_f(a['heldout_aji_of_the_split_fit'])} (fit without them) |
| held-out mAP 0.5:0.95 | {_f(b['heldout_map'])} | {_f(a.get('heldout_map_of_the_split_fit'))} (fit without them) |
| reference F1@0.5 ({metrics['reference']}) | {_f(b['reference_f1'])} | {_f(a['reference_f1'])} |
| reference AJI | {_f(b['reference_aji'])} | {_f(a['reference_aji'])} |
| weakest reference crop, F1@0.5 | {_f(b.get('reference_worst_crop_f1'))} | {_f(a.get('reference_worst_crop_f1'))} |
{note}
The written layer is refit on every correction with the chosen setting (anchor l2
{'none: unchanged' if c['l2'] is None else format(c['l2'], 'g')}, corrections' share {c['share']:.1f}); settings tried (a setting may drop the
reference F1 or AJI by at most {max_drop:.0%}; a refit is written only when it beats the
shipped layer on the held-out corrections):

| anchor l2 | corrections' share | held-out F1 | held-out AJI | reference F1 | reference AJI |
|---|---|---|---|---|---|
{rows}

The reference is measured on centre crops of the base model's validation images (nuclei cut
by a crop's edge count as they are cut); a user's own held-out regions are the measure of their lab.
"""
