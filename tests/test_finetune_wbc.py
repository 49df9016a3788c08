"""Fine-tuning the WBC classifier from corrections, torch-free, on a tiny model with the
bundled model's head layout (the real model: benchmarks/bench_finetune_wbc.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemato.core.cancel import CancelToken
from napari_hemato.core.errors import HematoError
from napari_hemato.finetune.common import FinetuneCancelled, Progress
from napari_hemato.finetune.embedding import add_embedding_output
from napari_hemato.finetune.wbc import finetune_wbc
from napari_hemato.models.cell_classifier import CLASS_NAMES, CellClassifier

from .onnx_models import tiny_wbc_model_dir
from .wbc_cells import NEW_LAB, REFERENCE_COLOURS, cell, finetunable_wbc_model

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny model with an embedding and a replay whose labels are its own calls."""
    return finetunable_wbc_model(tmp_path_factory.mktemp("m") / "wbc")


def write_class_folder(root: Path, label: str, images) -> Path:
    (root / label).mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        Image.fromarray(img).save(root / label / f"{label}_{k}.png")
    return root


def test_the_embedding_output_changes_nothing_else(tmp_path):
    folder = tiny_wbc_model_dir(tmp_path / "m")
    rng = np.random.default_rng(0)
    crops = [cell(c, rng) for c in REFERENCE_COLOURS]
    before, cams_before = CellClassifier(folder).classify_crops(crops, [30.0] * 4)
    assert add_embedding_output(folder) and not add_embedding_output(folder)  # once
    clf = CellClassifier(folder)
    after, cams_after = clf.classify_crops(crops, [30.0] * 4)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(cams_before[0], cams_after[0])
    probs, emb = clf.embed_crops(crops, [30.0] * 4)
    assert emb.shape == (4, 8) and np.array_equal(probs, after)


def test_corrections_teach_a_new_lab_and_keep_the_reference(model, tmp_path):
    rng = np.random.default_rng(2)
    base = CellClassifier(model, threads=1)
    new_cells = [cell(NEW_LAB, rng) for _ in range(60)]
    called = base.classify_crops(new_cells, [30.0] * 60)[0].argmax(1)
    target = next(c for c in ("LY", "MO", "EO") if CLASS_NAMES.index(c) not in set(called))
    data = write_class_folder(tmp_path / "corrections", target, new_cells[:30])
    steps = []
    result = finetune_wbc([data], tmp_path / "tuned", base=model, threads=1,
                          progress=Progress(lambda step, f: steps.append((step, f))))
    tuned = CellClassifier(result.folder, threads=1)
    unseen = tuned.classify_crops(new_cells[30:], [30.0] * 30)[0].argmax(1)
    assert np.mean(unseen == CLASS_NAMES.index(target)) >= 0.9  # was 0 before
    before, after = result.metrics["before"], result.metrics["after"]
    assert after["reference_accuracy"] >= before["reference_accuracy"] - 0.01
    assert result.corrections["cells"] == 30 and result.corrections["per_label"] == {target: 30}
    card = (result.folder / "MODEL_CARD.md").read_text()
    assert "30 cells" in card and str(data) in card
    assert tuned.spec.extra["finetune"]["base"]["name"] == "tiny-wbc"
    assert (result.folder / "replay.npz").is_file()  # it can be fine-tuned again
    assert [s for s, _ in steps][0] == "reading the corrections" and steps[-1] == ("done", 1.0)
    assert all(b >= a for (_, a), (_, b) in zip(steps, steps[1:], strict=False))


def test_coarse_group_folders_are_any_of_their_members(model, tmp_path):
    rng = np.random.default_rng(3)
    data = write_class_folder(tmp_path / "coarse", "NEU", [cell(NEW_LAB, rng) for _ in range(30)])
    result = finetune_wbc([data], tmp_path / "tuned", base=model, threads=1)
    probs = CellClassifier(result.folder, threads=1).classify_crops(
        [cell(NEW_LAB, rng) for _ in range(10)], [30.0] * 10)[0]
    neu = [CLASS_NAMES.index("SNE"), CLASS_NAMES.index("BNE")]
    assert np.mean(np.isin(probs.argmax(1), neu)) >= 0.9
    assert result.corrections["per_label"] == {"NEU": 30}


def test_cancel_writes_nothing(model, tmp_path):
    rng = np.random.default_rng(4)
    data = write_class_folder(tmp_path / "c", "LY", [cell(NEW_LAB, rng) for _ in range(10)])
    token = CancelToken()

    def cancel_while_fitting(step, fraction):
        if step.startswith("fitting"):
            token.cancel()

    with pytest.raises(FinetuneCancelled):
        finetune_wbc([data], tmp_path / "out", base=model, progress=Progress(cancel_while_fitting, token))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder


def test_bad_input_is_a_clear_error(model, tmp_path):
    (tmp_path / "RBC").mkdir()
    with pytest.raises(ValueError, match="no labelled cell images"):
        finetune_wbc([tmp_path], tmp_path / "o1", base=model)
    rng = np.random.default_rng(5)
    data = write_class_folder(tmp_path / "d", "LY", [cell(NEW_LAB, rng) for _ in range(5)])
    bare = tiny_wbc_model_dir(tmp_path / "bare")
    with pytest.raises(HematoError, match="no 'embedding' output"):
        finetune_wbc([data], tmp_path / "o2", base=bare)
    add_embedding_output(bare)
    with pytest.raises(HematoError, match="no replay.npz"):
        finetune_wbc([data], tmp_path / "o3", base=bare)
    other = tiny_wbc_model_dir(tmp_path / "other", seed=7)
    add_embedding_output(other)
    (other / "replay.npz").write_bytes((model / "replay.npz").read_bytes())
    with pytest.raises(HematoError, match="another model's trunk"):
        finetune_wbc([data], tmp_path / "o4", base=other)
    finetune_wbc([data], tmp_path / "o5", base=model)
    with pytest.raises(HematoError, match="already exists"):
        finetune_wbc([data], tmp_path / "o5", base=model)


def test_the_cli_writes_a_model_classify_cells_takes(model, tmp_path, capsys):
    from napari_hemato.cli import main

    rng = np.random.default_rng(6)
    data = write_class_folder(tmp_path / "c", "MO", [cell(NEW_LAB, rng) for _ in range(20)])
    assert main(["finetune", "wbc", "--data", str(data), "--out", str(tmp_path / "m"),
                 "--from", str(model), "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "reference accuracy" in printed.out
    assert "reading the corrections" in printed.err  # progress on stderr
    assert main(["classify-cells", str(data / "MO"), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "calls.csv")]) == 0
    calls = pd.read_csv(tmp_path / "calls.csv")
    assert (calls["class"] == "MO").mean() >= 0.9
    # class folders of single cells are no smear fields: one clear line, exit 2
    assert main(["finetune", "smear", "--data", str(data), "--out", str(tmp_path / "n")]) == 2
    assert "no exported cells" in capsys.readouterr().err


def test_the_bundled_model_ships_a_replay_of_its_own_trunk():
    """The bundled WBC model can be fine-tuned on a user's machine: embedding output, and a
    replay (embeddings only) that passes the trunk check on this machine's onnxruntime."""
    from napari_hemato.finetune.replay import load_replay
    from napari_hemato.models.registry import resolve_model

    folder = resolve_model("wbc", None)
    clf = CellClassifier(folder, threads=1)
    assert clf.has_embedding
    replay = load_replay(folder, clf)
    emb = clf.embed_crops([cell(REFERENCE_COLOURS[0], np.random.default_rng(0))], [30.0])[1]
    assert replay["train_x"].shape[1] == replay["val_x"].shape[1] == emb.shape[1]
    assert set(np.unique(replay["train_y"])) == set(range(len(CLASS_NAMES)))  # every class replayed
    assert len(replay["val_y"]) > 1000
