"""Shared pieces of the trainers' epoch loops (needs torch)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from napari_hemato.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from napari_hemato.train.common import cosine_lr, ema_update  # noqa: E402


def test_cosine_lr_warms_up_then_decays_to_two_percent():
    lrs = [cosine_lr(s, (s - 10) / 90, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.02, abs=1e-3) and cosine_lr(100, 1.0, 1.0, 10) == pytest.approx(0.02)
    assert cosine_lr(50, 7.0, 1.0, 10) == pytest.approx(0.02)  # progress is clipped


def test_ema_update_blends_floats_and_copies_integer_buffers():
    model, ema = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        ema.weight.fill_(1.0)
    model.num_batches_tracked.fill_(7)
    ema_update(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((2,), 1.5))
    assert int(ema.num_batches_tracked) == 7
    ema_update(ema, model, 0.0)
    assert torch.equal(ema.weight, model.weight)


def test_checkpoint_write_is_atomic(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"w": torch.arange(4)}, {"epoch": 3})
    with pytest.raises(TypeError):  # the state is not JSON: nothing is written
        save_checkpoint(path, {"w": torch.arange(5)}, {"epoch": 4, "bad": lambda: None})
    tensors, state = load_checkpoint(path)  # the failed write left the previous checkpoint intact
    assert state["epoch"] == 3 and torch.equal(tensors["w"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temporary left
