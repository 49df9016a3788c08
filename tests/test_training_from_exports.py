"""Corrections feed retraining: the plugin's instance exports read back as training regions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.io import imsave

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.export.formats import export_annotations
from napari_hemato.core.export.regions import list_instance_exports, load_instance_export
from napari_hemato.train import data_nuclei as dn
from napari_hemato.train import data_smear as ds

ORIGIN = (30, 50)
FORMATS = ["tiff", "omezarr", "coco", "geojson"]


def field(tmp_path):
    """A 200x300 RGB image and a corrected annotation set over part of it."""
    rng = np.random.default_rng(0)
    image = rng.integers(180, 250, (200, 300, 3), dtype=np.uint8)
    labels = np.zeros((120, 160), np.uint32)
    yy, xx = np.indices(labels.shape)
    centres = [(30, 30, 5), (30, 90, 9), (80, 60, 14), (90, 130, 21)]
    for cy, cx, v in centres:
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 15**2] = v
    y0, x0 = ORIGIN
    image[y0:y0 + 120, x0:x0 + 160][labels > 0] = (120, 60, 140)
    path = tmp_path / "images" / "field_A.png"
    path.parent.mkdir()
    imsave(path, image, check_contrast=False)
    table = pd.DataFrame({
        "id": [5, 9, 14, 21], "class": ["SNE", "RBC", "Platelets", "artefact"],
        "cell_type": ["WBC", "RBC", "Platelets", "artefact"],
        "confidence": [0.9, 0.8, 0.7, 0.6], "provenance": ["corrected", "auto", "manual", "auto"],
        "reviewed": [True, True, False, True],
    })
    ann = AnnotationSet("instances", table, ["RBC", "WBC", "Platelets"], labels, ORIGIN, 0.25,
                        str(path), image.shape[:2])
    return image, ann


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_instance_export_reads_back_as_its_image_region(tmp_path, fmt):
    image, ann = field(tmp_path)
    export_annotations(ann, tmp_path / "exports", [fmt], name="field_A")
    [path] = list_instance_exports(tmp_path / "exports")
    region = load_instance_export(path)
    y0, x0 = ORIGIN
    np.testing.assert_array_equal(region.image, image[y0:y0 + 120, x0:x0 + 160])
    np.testing.assert_array_equal(region.labels > 0, ann.labels > 0)
    assert sorted(region.classes.values()) == sorted(ann.table["class"])
    assert region.mpp == 0.25 and region.key == f"export/{path.name}"


def test_the_image_is_found_beside_the_export_or_in_a_folder(tmp_path):
    image, ann = field(tmp_path)
    export_annotations(ann, tmp_path / "exports", ["tiff"], name="field_A")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "images" / "field_A.png").rename(moved / "field_A.png")
    [path] = list_instance_exports(tmp_path / "exports")
    with pytest.raises(FileNotFoundError, match="cannot find the image"):
        load_instance_export(path)
    assert load_instance_export(path, images=moved).image.shape == (120, 160, 3)


def test_nucleus_exports_become_training_images_at_the_model_pixel_size(tmp_path):
    _, ann = field(tmp_path)
    export_annotations(ann, tmp_path / "exports", ["tiff"], name="field_A")
    assert not dn.is_reference_folder(tmp_path / "exports")
    [item] = dn.load_export_images(tmp_path / "exports")
    assert item.source == "export"
    assert item.image.shape[:2] == item.labels.shape == (60, 80)  # 0.25 -> 0.5 µm/px
    assert len(np.unique(item.labels)) - 1 == 4
    assert item.targets["fg"].sum() == (item.labels > 0).sum()
    with pytest.raises(FileNotFoundError, match="no exported instance files"):
        dn.load_export_images(tmp_path / "images")


def test_smear_exports_use_the_cell_type_and_ignore_unknown_classes(tmp_path):
    _, ann = field(tmp_path)
    export_annotations(ann, tmp_path / "exports", ["geojson"], name="field_A")
    [path] = list_instance_exports(tmp_path / "exports")
    s = ds.load_instance_export_sample(path, mpp=0.25)
    names = {ds.CLASS_NAMES[c] for c in s.classes[1:] if c >= 0}
    assert names == {"WBC", "RBC", "Platelets"}  # SNE is a WBC subtype: the cell type counts
    # the 'artefact' object is neither background nor a cell: ignored in the losses
    cy, cx = 90, 130
    assert s.labels[cy, cx] == 0 and s.ignore[cy, cx]
