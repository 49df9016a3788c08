"""Mitosis detection on H&E: points, the mitotic count per 10 HPF and per 2 mm², hotspot."""

from __future__ import annotations

from napari_hemato.core.summary import hotspot, mitotic_count
from napari_hemato.tasks.base import Task


class MitosisTask(Task):
    name = "mitosis"
    title = "H&E mitotic figure detection (points)"

    def claims(self, annotations) -> bool:
        return annotations.kind == "points"

    def summary(self, table, *, area_mm2=None, mpp=None) -> dict:
        if not area_mm2:
            return {}
        out = {"mitotic_count": mitotic_count(table, area_mm2=area_mm2)}
        if mpp:
            out["hotspot"] = hotspot(table, mpp=mpp)
        return out

    def summary_lines(self, summary: dict) -> list[str]:
        if "mitotic_count" not in summary:
            return []
        c = summary["mitotic_count"]
        lines = [f"{c['mitoses']} mitoses in {c['area_mm2']} mm²: {c['per_10_hpf']} / 10 HPF, "
                 f"{c['per_2_mm2']} / 2 mm²"]
        spot = summary.get("hotspot")
        if spot:
            lines.append(f"hotspot: {spot['count']} in a {spot['side_um']:.0f} µm square")
        return lines


TASK = MitosisTask()
