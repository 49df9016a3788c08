"""analyze FOLDER on smear fields that state no pixel size: one pooled reading per image size."""

from __future__ import annotations

import shutil

import pytest

from napari_hemato.cli import main
from napari_hemato.core.store import ResultStore

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def fields(shared_data, tmp_path_factory):
    from napari_hemato.train.data_smear import read_split

    bccd = shared_data / "bccd"
    folder = tmp_path_factory.mktemp("fields")
    for stem in read_split(bccd, "val")[:9]:
        shutil.copyfile(bccd / "JPEGImages" / f"{stem}.jpg", folder / f"{stem}.jpg")
    return sorted(folder.iterdir())


def test_a_folder_of_one_camera_is_measured_once(fields):
    from napari_hemato.api import load_predictor
    from napari_hemato.tasks.smear import POOL_FIELDS, pooled_field_mpp

    predictor = load_predictor("smear")
    pooled = pooled_field_mpp(fields, predictor)
    assert list(pooled) == [(480, 640)]
    assert 0.07 < pooled[(480, 640)] < 0.1  # BCCD's camera: 0.08 µm/px
    assert pooled_field_mpp(fields[: POOL_FIELDS - 1], predictor) == {}  # too few to pool


@pytest.mark.parametrize("ruler", ["pooled", "per-image"])
def test_analyze_folder_uses_the_pooled_pixel_size(fields, tmp_path, ruler):
    """Pooled: one reading for the folder. Eight BCCD fields' readings have a quartile spread
    near the pooling limit (0.19-0.21 of their median), so the pooled case reads two fields,
    four copies each (their readings 0.074 and 0.085 µm/px: a spread of 0.15): the pooled value
    (the training images' 0.08, which it agrees with) is what every field gets."""
    out = tmp_path / "out"
    if ruler == "pooled":
        inputs = []
        for k, source in enumerate([fields[0], fields[3]] * 4):
            inputs.append(tmp_path / f"copy{k}_{source.name}")
            shutil.copyfile(source, inputs[-1])
    else:
        inputs = fields[:8]
    assert main(["analyze", *map(str, inputs), "--task", "smear", "--no-classifier",
                 "--out-dir", str(out), "--ruler", ruler]) == 0
    configs = [ResultStore.open(p).config["slide"] for p in sorted(out.glob("*.zarr"))]
    assert len(configs) == 8 and {c["mpp_source"] for c in configs} == {"red-cells"}
    mpps = {c["mpp"] for c in configs}
    if ruler == "pooled":
        assert mpps == {0.08}
    else:
        assert len(mpps) > 1  # field by field the red cells scatter



def test_white_cells_are_classified_at_their_fields_own_ruler_reading(fields, tmp_path, monkeypatch):
    """The classifier keeps its own ruler (it reads ~0.84× the detector's on BCCD), read once
    on each whole field at the white cells' working resolution, not around each cell."""
    from napari_hemato.core import cells

    seen = []
    classify = cells.classify_wbcs

    def spy(table, slide, classifier, **kw):
        seen.append(kw.get("mpp"))
        return classify(table, slide, classifier, **kw)

    monkeypatch.setattr(cells, "classify_wbcs", spy)
    out = tmp_path / "out"
    assert main(["analyze", *map(str, fields[:3]), "--task", "smear", "--out-dir", str(out)]) == 0
    assert len(seen) == 3 and all(m is not None and 0.05 < m < 0.13 for m in seen)
    seen.clear()  # a stated pixel size wins
    assert main(["analyze", str(fields[0]), "--task", "smear", "--mpp", "0.08", "--out",
                 str(tmp_path / "one.zarr")]) == 0
    assert seen == [None]


def test_a_classified_table_reads_the_same_field_ruler(fields, tmp_path):
    """A finished run's table (``class`` holds the subtypes, ``cell_type`` the types; a resumed
    run classifies it again) gives the classifier the same whole-field reading as the fresh
    detector table: the white cells are found by their type either way."""
    from napari_hemato.api import analyze
    from napari_hemato.core.slide import open_slide
    from napari_hemato.tasks import get_task
    from napari_hemato.tasks.smear import classifier_field_mpp

    table = analyze(fields[0], task="smear", out=tmp_path / "run.zarr").table()
    assert "cell_type" in table and (table["cell_type"] == "WBC").any()
    detector = table.assign(**{"class": table["cell_type"]}).drop(columns="cell_type")
    classifier = get_task("smear").load_stages()["wbc"]
    with open_slide(fields[0]) as slide:
        classified = classifier_field_mpp(slide, table, classifier)
        fresh = classifier_field_mpp(slide, detector, classifier)
    assert classified is not None and classified == fresh
