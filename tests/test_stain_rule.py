"""The platelet stain rule (core.stain_rule) on a synthetic smear tile, through tile_objects
and tile_table as the engine runs them, and on the bundled smear field."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemato.core.objects import tile_objects
from napari_hemato.core.spec import ModelSpec
from napari_hemato.core.stain_rule import StainRule
from napari_hemato.core.tiling import plan_tiles

MPP = 0.16  # the smear model's grid: 1 µm² = 39 px
NAMES = ("RBC", "WBC", "Platelets")
RULE = {"to": "Platelets", "from": ["RBC"], "min_area_um2": 0.5, "max_area_um2": 8.0,
        "min_blue_over_red": 4.0}
GLASS = (225, 215, 220)
PURPLE = (150, 110, 190)  # blue over red: a platelet's granules
PINK = (215, 150, 160)  # red over blue: a red cell
#: (name, centre, radius px, colour): areas 2.0, 2.0, 0.7, 0.7 and 113 µm²; "edge" is cut
BLOBS = [("purple", (40, 40), 8, PURPLE), ("pink", (40, 100), 8, PINK),
         ("tiny_purple", (100, 40), 3, PURPLE), ("tiny_pink", (100, 100), 3, PINK),
         ("edge", (70, 3), 8, PURPLE), ("big_purple", (170, 90), 60, PURPLE)]


def _spec(rule=True):
    pp = {"threshold": 0.5, "min_distance_um": 2.0, "min_area_um2": 1.5}
    if rule:
        pp["stain_rule"] = RULE
    return ModelSpec(name="toy-smear", version="0", task="smear", kind="instances", mpp=MPP,
                     tile=256, max_object_um=40.0, receptive_field_px=2, class_names=NAMES,
                     outputs={"foreground": "fg", "class_probs": "probs"}, postprocess=pp)


def _tile():
    """Image, outputs (every blob foreground, 90 % RBC) and the blob each object is."""
    shape = (256, 256)
    image = np.empty((*shape, 3), np.uint8)
    image[:] = GLASS
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fg = np.zeros(shape, np.float32)
    for _, (cy, cx), r, colour in BLOBS:
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[disk] = colour
        fg[disk] = 0.95
    probs = np.zeros((3, *shape), np.float32)
    probs[0], probs[1], probs[2] = 0.9 * fg, 0.05 * fg, 0.05 * fg + (1 - fg)
    return image, {"foreground": fg[None], "class_probs": probs}


def _run(spec, with_image=True):
    image, outputs = _tile()
    plan = plan_tiles(image.shape[:2], tile=256, halo=0)
    out = tile_objects(outputs, plan[0], plan, spec, MPP, stride=1000,
                       image=image if with_image else None)
    c = out.columns
    best = np.asarray(c["prob"]).argmax(1)
    if "rule_class" in c:
        best = np.where(c["rule_class"] >= 0, c["rule_class"], best)
    found = {}
    for name, (cy, cx), *_ in BLOBS:
        hit = [k for k in range(out.n_objects)
               if abs(c["y"][k] - cy) < 4 and abs(c["x"][k] - min(max(cx, 4), 252)) < 6]
        found[name] = NAMES[best[hit[0]]] if hit else None
    return found, out


def test_small_purple_objects_become_platelets_and_the_rest_stays():
    found, out = _run(_spec())
    assert found == {"purple": "Platelets", "pink": "RBC", "tiny_purple": "Platelets",
                     "tiny_pink": None, "edge": "RBC", "big_purple": "RBC"}
    # the network's probabilities are kept: a re-typed object's confidence is low
    k = int(np.flatnonzero(out.columns["rule_class"] == 2)[0])
    assert out.columns["prob"][k].argmax() == 0


def test_without_the_image_or_the_rule_objects_are_the_networks():
    expected = {"purple": "RBC", "pink": "RBC", "tiny_purple": None, "tiny_pink": None,
                "edge": "RBC", "big_purple": "RBC"}
    assert _run(_spec(), with_image=False)[0] == expected
    found, out = _run(_spec(rule=False))
    assert found == expected and "rule_class" not in out.columns


def test_a_rule_naming_unknown_classes_is_refused():
    with pytest.raises(ValueError, match="not among"):
        StainRule.from_spec({"stain_rule": {**RULE, "to": "PLT"}}, NAMES)
    with pytest.raises(ValueError, match="unknown keys"):
        StainRule.from_spec({"stain_rule": {**RULE, "min_blue_over_rd": 2.0}}, NAMES)
    with pytest.raises(ValueError, match="min_area_um2"):
        StainRule.from_spec({"stain_rule": {**RULE, "min_area_um2": 9.0}}, NAMES)


def test_the_table_shows_the_rule_class_with_the_networks_probabilities():
    from napari_hemato.core.geometry import WorkGrid
    from napari_hemato.core.table import tile_table

    _, out = _run(_spec())
    grid = WorkGrid(level=0, downsample=1.0, factor=1.0, roi=(0, 0, 256, 256), mpp0=MPP, mpp=MPP,
                    mpp_assumed=False)
    table = tile_table(out, grid, _spec())
    plt = table[table["class"] == "Platelets"]
    assert len(plt) == 2 and (table["class"] == "RBC").sum() == 3
    np.testing.assert_allclose(plt["confidence"], plt["prob_Platelets"])
    assert (plt["prob_RBC"] > plt["prob_Platelets"]).all()  # the network's view, kept


def test_the_sample_fields_small_platelets_are_found(tmp_path):
    """The bundled cbc field (another lab than BCCD): three platelets of 1–3 µm² the network
    alone calls red cells (looked at: purple granules on glass) are platelets with the stain
    rule, and, since 0.2.0, with the colour match alone (the field's darker glass replaced by
    BCCD's, the network finds them itself)."""
    import json
    import shutil

    from napari_hemato import api
    from napari_hemato.models.registry import resolve_model
    from napari_hemato.samples import sample_path

    field = sample_path("smear_field")

    def without(*keys):
        folder = tmp_path / "-".join(keys)
        shutil.copytree(resolve_model("smear", None), folder)
        spec = json.loads((folder / "model.json").read_text())
        for key in keys:
            spec["postprocess"].pop(key, None)
            spec["preprocess"].pop(key, None)
        (folder / "model.json").write_text(json.dumps(spec))
        return folder

    small = np.array([[194, 1083], [302, 132], [326, 459]])

    def platelets(model, tile=None):
        t = api.analyze(field, task="smear", model=model, threads=2, out=tmp_path / "run.zarr",
                        overwrite=True, classifier=False, tissue="none", tile=tile).table()
        return t.loc[t["class"] == "Platelets", ["y", "x"]].to_numpy()

    def found(points):
        return [bool(len(points)) and bool(np.hypot(*(points - p).T).min() < 5) for p in small]

    with_rule = platelets(None)
    network_alone = platelets(without("stain_rule", "colour_match"))
    assert found(with_rule) == [True] * 3 and found(network_alone) == [False] * 3
    assert len(with_rule) == len(network_alone) + 3
    assert found(platelets(without("colour_match"))) == [True] * 3  # the rule finds them
    assert found(platelets(without("stain_rule"))) == [True] * 3  # the colour match too
    # two tiles (each its own red-cell reference, the glass read in the halo): the same platelets
    tiled = platelets(None, tile=400)
    assert len(tiled) == len(with_rule) and found(tiled) == [True] * 3
