"""README screenshots from the bundled models on the bundled samples (real viewer, Xvfb).

Takes ``analysed_sample.png``, ``review_panel.png`` and (when the smear model is
bundled) ``smear_review.png``. They are written to ``docs/`` (which the README
embeds) only with ``HEMATO_UPDATE_DOCS=1``; otherwise to a temporary folder, so an
ordinary test run leaves the working tree clean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_hemato.models.registry import bundled_models

pytestmark = pytest.mark.gui
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def _shots_folder(tmp_path_factory, monkeypatch):
    """``docs/`` with HEMATO_UPDATE_DOCS=1, else a temporary folder."""
    import os

    if os.environ.get("HEMATO_UPDATE_DOCS") != "1":
        monkeypatch.setattr(f"{__name__}.DOCS", tmp_path_factory.mktemp("docs"))


def analyse(qtbot, widget, task, roi_shape=None, mpp=None):
    widget.task.value = task
    if mpp is not None:  # a JPEG has no pixel size: the user types it in
        widget.mpp.value = mpp
    if roi_shape is not None:
        widget.region.value = "drawn shapes"
        widget.shapes.value = roi_shape
    widget.start()
    with qtbot.waitSignal(widget.worker.finished, timeout=600_000):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)


def save(viewer, name, *, canvas_only=False):
    from qtpy.QtWidgets import QApplication
    from skimage.io import imsave

    for _ in range(5):  # let docks lay out before the grab
        QApplication.processEvents()

    DOCS.mkdir(exist_ok=True)
    shot = viewer.screenshot(canvas_only=canvas_only, flash=False)
    imsave(DOCS / name, shot, check_contrast=False)
    return shot


@pytest.mark.skipif("nuclei" not in bundled_models(), reason="no bundled nuclei model")
def test_he_walkthrough_screenshots(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    import shutil

    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.samples import sample_path

    slide = tmp_path / "cmu_small_region.svs"  # a copy: autosave writes beside the image
    shutil.copy(sample_path("he_slide"), slide)
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    [image] = viewer.open(slide, plugin="napari-hemato")
    mpp = image.scale[0]
    box = np.array([[1500, 850], [1500, 1450], [2050, 1450], [2050, 850]]) * mpp
    shapes = viewer.add_shapes([box], shape_type="polygon", name="region", scale=(1, 1),
                               units=("um", "um"), edge_color="yellow", face_color="transparent",
                               edge_width=2)
    widget = AnalyzeWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Analyse")
    analyse(qtbot, widget, "nuclei", shapes)
    nuclei = viewer.layers[-1]
    assert len(nuclei.features) > 100
    viewer.reset_view()
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (1775 * mpp, 1150 * mpp)
    camera.zoom = 2.2 / mpp
    shot = save(viewer, "analysed_sample.png")
    assert shot[..., :3].std() > 10

    viewer.window.remove_dock_widget(dock)
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review and correct")
    viewer.layers.selection.active = nuclei
    shapes.visible = False
    review.build_queue()
    review.next()
    qtbot.wait(300)
    save(viewer, "review_panel.png")


@pytest.mark.skipif(not {"smear", "wbc"} <= set(bundled_models()), reason="no bundled smear/WBC models")
def test_smear_walkthrough_screenshot(make_napari_viewer, qtbot, tmp_path):
    import shutil

    from napari_hemato._widgets.analyze import AnalyzeWidget
    from napari_hemato._widgets.review import ReviewWidget
    from napari_hemato.samples import sample_path

    field = tmp_path / "smear_field_cbc.jpg"
    shutil.copy(sample_path("smear_field"), field)
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    viewer.open(field, plugin="napari-hemato")
    widget = AnalyzeWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Analyse")
    analyse(qtbot, widget, "smear", mpp=0.08)  # RBCs ~100 px across: ~0.08 µm/px
    cells = viewer.layers[-1]
    table = cells.features
    assert (table["cell_type"] == "WBC").sum() >= 1 and (table["cell_type"] == "RBC").sum() > 20
    # the JPEG layer is in pixels: the µm/px typed into the widget must not put the results
    # in µm (a tiny patch in the image's corner); they cover the image, pixel for pixel
    image = viewer.layers["smear_field_cbc"]
    np.testing.assert_allclose(cells.extent.world, image.extent.world, atol=2.0)
    viewer.window.remove_dock_widget(dock)
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review and correct")
    viewer.layers.selection.active = cells
    wbc = int(table.loc[table["cell_type"] == "WBC", "id"].iloc[0])
    review.select(wbc, zoom=True)  # framed at a review scale, boxed, the CAM captioned
    assert not review.cam.pixmap().isNull(), review.session.row(wbc).to_dict()
    assert review.cam_caption.isVisibleTo(review) and "class activation" in review.cam_caption.text()
    save(viewer, "smear_review.png")
