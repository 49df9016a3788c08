"""Mitosis negative tissue: the DSB tiles join the sources, split by image into train, tune
and test, and the threshold that holds false detections on tune tissue to a budget."""

from __future__ import annotations

import pytest

from tests.synthetic import fake_dsb_tissue as _fake_dsb


def test_dsb_tiles_are_split_by_image_deterministically(tmp_path):
    from napari_hemato.train import data_mitosis as dm

    root = _fake_dsb(tmp_path)
    a = dm.dsb_sources(root)
    assert a == dm.dsb_sources(root) and len(a) == 10
    held = [s for s in a if s.holdout == "all"]
    assert len(held) == round(dm.DSB_HELD_OUT * 10) == 3
    assert sorted(s.role for s in held) == ["test", "tune", "tune"]
    assert all(s.group == "dsb" and s.holdout in ("all", "none") for s in a)
    mpps = [s.mpp for s in a]  # larger nuclei, smaller pixels
    assert mpps == sorted(mpps, reverse=True) and len(set(mpps)) > 5
    assert dm.dsb_sources(tmp_path / "nowhere") == []


def test_tissue_regions_partition_the_held_out_parts(tmp_path):
    from napari_hemato.train import data_mitosis as dm

    root = _fake_dsb(tmp_path)
    parts = {p: [r.source.key for r in dm.tissue_regions(root, part=p, mpp=0.25)]
             for p in ("train", "val", "tune", "test")}
    assert len(parts["train"]) == 7
    assert sorted(parts["tune"] + parts["test"]) == sorted(parts["val"])
    assert not set(parts["tune"]) & set(parts["test"])
    assert not set(parts["train"]) & set(parts["val"])
    region = dm.tissue_regions(root, part="tune", mpp=0.25)[0]  # resampled to the model's size
    assert region.image.shape[0] == round(256 * region.source.mpp / 0.25)
    with pytest.raises(ValueError, match="part"):
        dm.tissue_regions(root, part="validation", mpp=0.25)


def test_fixed_sources_have_a_group_and_a_held_out_role():
    from napari_hemato.train import data_mitosis as dm

    for s in dm.TISSUE_SOURCES:
        assert s.group and s.role in ("tune", "test")
    held = {s.role for s in dm.TISSUE_SOURCES if s.holdout != "none"}
    assert held == {"tune", "test"}  # both held-out sets have fixed tissue as well as DSB


@pytest.mark.parametrize(("scores", "mm2", "expected"), [
    ([0.97, 0.93, 0.5], 0.46, 0.94),  # one allowed on 0.46 mm² at 2/mm²
    ([0.97, 0.93, 0.5], 0.2, 0.98),  # none allowed on 0.2 mm²
    ([0.99, 0.995], 0.1, 0.99),  # too many even at the top of the grid: the top
    ([0.3, 0.2], 5.0, 0.1),  # quiet tissue: the bottom of the grid
])
def test_budget_threshold(scores, mm2, expected):
    from napari_hemato.train.evaluate_mitosis import budget_threshold

    assert budget_threshold(scores, mm2, 2.0) == pytest.approx(expected)


def test_tissue_evaluation_pools_by_role_and_group(tmp_path):
    """``evaluate mitosis``'s tissue part through the runtime (bundled model, no torch):
    every tile analysed, counted in its held-out role, pooled per group, with the budget."""
    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.train.evaluate_mitosis import _low_threshold_copy, evaluate_tissue

    root = _fake_dsb(tmp_path / "data", n=6)
    spec = load_spec(resolve_model("mitosis", None))
    low = _low_threshold_copy(spec, tmp_path / "low")
    m = evaluate_tissue(spec, low, root, workdir=tmp_path / "work", threads=1)
    assert len(m["images"]) == 6 and {r["group"] for r in m["images"]} == {"dsb"}
    roles = sorted(k for r in m["images"] for k in ("tune", "test", "trained") if k in r)
    assert roles == ["test", "trained", "trained", "trained", "trained", "tune"]
    pooled = m["pooled"]
    assert set(pooled) == {"test", "test/dsb", "trained", "trained/dsb", "tune", "tune/dsb"}
    assert pooled["test"] == pooled["test/dsb"] and pooled["test"]["tissue_mm2"] > 0
    rates = [pooled["trained"]["per_mm2_at"][t] for t in ("0.5", "0.7", "0.9")]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never adds detections
    assert 0.1 <= m["budget"]["tune_threshold"] <= 0.99
    assert m["worst_test_image"]["group"] == "dsb"
