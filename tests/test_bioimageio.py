"""Models export as bioimage.io packages that bioimageio's own tools accept."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import yaml

from napari_hemato.cli import main
from napari_hemato.core.spec import load_spec
from napari_hemato.models.onnx_opset import onnx_opset
from napari_hemato.models.registry import bundled_models


def _rdf(pkg) -> dict:
    with zipfile.ZipFile(pkg) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _reproduce(pkg, rdf: dict) -> None:
    """What `bioimageio test` checks, redone by hand: preprocessing + ONNX on the test input."""
    import onnxruntime as ort

    with zipfile.ZipFile(pkg) as zf:
        def npy(name):
            import io

            return np.load(io.BytesIO(zf.read(name)), allow_pickle=False)

        (inp,) = rdf["inputs"]
        x = npy(inp["test_tensor"]["source"])
        kw = inp["preprocessing"][0]["kwargs"]
        x = (x - np.asarray(kw["mean"], np.float32)[None, :, None, None]) / \
            np.asarray(kw["std"], np.float32)[None, :, None, None]
        session = ort.InferenceSession(zf.read(rdf["weights"]["onnx"]["source"]),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
        assert len(got) == len(rdf["outputs"])
        for value, out in zip(got, rdf["outputs"], strict=True):
            np.testing.assert_allclose(value, npy(out["test_tensor"]["source"]), rtol=1e-3,
                                       atol=1e-4)


def _check_with_bioimageio(pkg) -> None:
    spec = pytest.importorskip("bioimageio.spec")
    descr = spec.load_description(str(pkg), perform_io_checks=True)
    summary = descr.validation_summary
    assert summary.status in ("passed", "valid-format"), summary.format()
    try:
        from bioimageio.core import test_model
    except ImportError:  # scripts/test.sh installs it (see the testing extra's comment)
        pytest.skip("bioimageio.core is not installed: format validated, `bioimageio test` not run")
    summary = test_model(str(pkg))
    assert summary.status == "passed", summary.format()


def test_bundled_nuclei_model_passes_bioimageio_test(tmp_path):
    pkg = tmp_path / "nuclei.zip"
    assert main(["models", "export-bioimageio", "nuclei", "--out", str(pkg)]) == 0
    spec = load_spec(bundled_models()["nuclei"])
    rdf = _rdf(pkg)
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    assert rdf["name"] == spec.name and rdf["version"] == spec.version
    (inp,) = rdf["inputs"]
    space = [a for a in inp["axes"] if a["type"] == "space"]
    assert [a["id"] for a in space] == ["y", "x"]
    assert all(a["unit"] == "micrometer" and a["scale"] == spec.mpp for a in space)
    assert [a for a in inp["axes"] if a["type"] == "channel"][0]["channel_names"] == ["R", "G", "B"]
    outs = {o["id"]: o for o in rdf["outputs"]}
    assert set(outs) == {"foreground", "distance"}
    for out in outs.values():
        channel = [a for a in out["axes"] if a["type"] == "channel"][0]
        assert channel["channel_names"] == [out["id"]]
        assert all(a["unit"] == "micrometer" and a["scale"] == spec.mpp
                   for a in out["axes"] if a["type"] == "space")
    own = rdf["config"]["napari_hemato"]
    assert own["task"] == "nuclei" and own["class_names"] == ["nucleus"]
    assert own["halo_px"] == spec.halo and own["postprocess"] == spec.postprocess
    assert rdf["weights"]["onnx"]["opset_version"] == onnx_opset(spec.onnx_path)
    with zipfile.ZipFile(pkg) as zf:
        names = set(zf.namelist())
        card = zf.read("MODEL_CARD.md").decode()
    assert {rdf["documentation"], *rdf["covers"], "model.onnx"} <= names
    assert card == (spec.folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert rdf["license"] and rdf["authors"] and rdf["cite"][0]["doi"]
    _reproduce(pkg, rdf)
    _check_with_bioimageio(pkg)
    assert main(["models", "export-bioimageio", "nuclei", "--out", str(pkg)]) == 2  # exists


def test_fine_tuned_folder_with_class_outputs(tmp_path):
    """A model folder of one's own (no model card), with a class output: class names on its axis."""
    pytest.importorskip("onnx")
    from napari_hemato.models.bioimageio import export_bioimageio
    from tests.onnx_models import dark_blob_model_dir

    folder = dark_blob_model_dir(tmp_path / "model", task="smear", class_names=("A", "B"),
                                 outputs={"foreground": "fg", "class_probs": "probs"})
    spec = load_spec(folder)
    pkg = export_bioimageio(folder, tmp_path / "mine.zip")
    rdf = _rdf(pkg)
    channels = {o["id"]: [a for a in o["axes"] if a["type"] == "channel"][0]["channel_names"]
                for o in rdf["outputs"]}
    assert channels[spec.outputs["class_probs"]] == list(spec.class_names)
    with zipfile.ZipFile(pkg) as zf:
        assert spec.name in zf.read("MODEL_CARD.md").decode()
    _reproduce(pkg, rdf)
    _check_with_bioimageio(pkg)


def test_the_colour_matched_smear_model_packages_a_matched_test_input(tmp_path):
    """The smear detector matches each image's colour before its network
    (``preprocess.colour_match``, not a bioimage.io preprocessing): the package says so, keeps
    the parameters in its config, and its test input is already matched, so the package's own
    preprocessing + network reproduce the outputs (and ``bioimageio test`` passes)."""
    from napari_hemato.core.colour_match import match_colour

    pkg = tmp_path / "smear.zip"
    assert main(["models", "export-bioimageio", "smear", "--out", str(pkg)]) == 0
    rdf = _rdf(pkg)
    params = rdf["config"]["napari_hemato"]["preprocess"]["colour_match"]
    assert "colour-matched" in rdf["inputs"][0]["description"]
    with zipfile.ZipFile(pkg) as zf:
        import io

        x = np.load(io.BytesIO(zf.read(rdf["inputs"][0]["test_tensor"]["source"])), allow_pickle=False)
    image = x[0].transpose(1, 2, 0).astype(np.uint8)
    np.testing.assert_array_equal(match_colour(image, params), image)  # matched once already
    _reproduce(pkg, rdf)
    _check_with_bioimageio(pkg)
