"""The smear task end to end: detector -> every WBC classified by the bundled WBC model.

The detector here is a tiny ONNX model that calls every dark object "WBC" (the real smear
detector is trained separately); the point is the chaining, the table and the summary.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.models.registry import bundled_models

from .onnx_models import dark_blob_model_dir

pytestmark = pytest.mark.skipif("wbc" not in bundled_models(), reason="no bundled WBC model")
SUBTYPES = ["SNE", "BNE", "EO", "BA", "LY", "MO", "MMY", "MY", "PMY", "ERB", "PLT"]


def test_smear_run_adds_wbc_subtypes_and_differential(tmp_path, capsys):
    import json

    from napari_hemato.cli import main
    from napari_hemato.samples import sample_path

    detector = dark_blob_model_dir(tmp_path / "det", task="smear", class_names=("WBC", "RBC"),
                                   outputs={"foreground": "fg", "class_probs": "probs"},
                                   max_object_um=30.0,
                                   postprocess={"threshold": 0.5, "min_distance_um": 6.0,
                                                "min_area_um2": 20.0})
    code = main(["analyze", str(sample_path("smear_field")), "--task", "smear", "--model",
                 str(detector), "--mpp", "0.16", "--out", str(tmp_path / "r.zarr"),
                 "--table", str(tmp_path / "cells.csv"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    import pandas as pd

    table = pd.read_csv(tmp_path / "cells.csv")
    wbc = table[table["cell_type"] == "WBC"]
    assert len(wbc) >= 1
    assert set(wbc["class"]) <= set(SUBTYPES)
    np.testing.assert_allclose(wbc[[f"prob_{c}" for c in SUBTYPES]].sum(axis=1), 1.0, atol=1e-3)
    d = summary["differential"]
    assert d["wbc_total"] == len(wbc) and sum(d["counts"].values()) == len(wbc)
