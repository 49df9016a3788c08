"""``evaluate wbc`` end to end on a few held-out PBC images (the code path the card's numbers
come from): per-image ruler and classify-cells' pooled ruler agree on what they read."""

from __future__ import annotations

import json
import shutil


def test_evaluate_wbc_on_a_few_held_out_images(shared_data, tmp_path):
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train.evaluate_wbc import evaluate_wbc

    folder = tmp_path / "wbc"
    shutil.copytree(resolve_model("wbc", None), folder)
    spec = json.loads((folder / "model.json").read_text())
    files = spec["extra"]["split"]["validation_files"]
    spec["extra"]["split"]["validation_files"] = files[:: max(1, len(files) // 60)][:60]
    spec["extra"].pop("calibration", None)
    (folder / "model.json").write_text(json.dumps(spec))
    (tmp_path / "no_bccd").mkdir()
    m = evaluate_wbc(folder, shared_data / "pbc", bccd_dir=tmp_path / "no_bccd", threads=2, scales=())
    assert m["data"]["n_validation"] == 60
    assert m["validation"]["accuracy"] >= 0.8  # the card: 0.9125 over 1,782 images
    pooled = m["validation_pooled_ruler"]
    assert pooled["n_sampled"] == 24 and 0.19 < pooled["mpp"] < 0.25  # PBC: ~0.22 µm/px
    assert pooled["agreement_with_per_image_ruler"] >= 0.9
    assert abs(pooled["accuracy"] - m["validation"]["accuracy"]) <= 0.1
    assert "bccd_groups" not in m and "bccd_sanity" not in m  # no BCCD folder: skipped, not failed
