"""The one training loop: resume == uninterrupted, time budget, pickle-free checkpoint, export."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402

from napari_hemato.train import checkpoint as ck  # noqa: E402
from napari_hemato.train import loop  # noqa: E402


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


class ToyRecipe(loop.Recipe):
    """Random batches from the loop's generator; dropout uses torch's; a step counter as state."""

    def __init__(self, *, kill_at: int | None = None, sleep: float = 0.0) -> None:
        self.drawn, self.kill_at, self.sleep = 0, kill_at, sleep

    def batch(self, rng):
        if self.drawn == self.kill_at:
            raise Killed
        self.drawn += 1
        time.sleep(self.sleep)
        x = torch.from_numpy(rng.normal(size=(4, 3, 8, 8)).astype(np.float32))
        return x, x.mean(dim=1, keepdim=True) ** 2

    def loss(self, net, batch):
        x, y = batch
        mse = ((net(x) - y) ** 2).mean()
        return {"loss": mse + 1e-3 * sum(p.abs().sum() for p in net.parameters()), "mse": mse}

    def evaluate(self, net):
        with torch.no_grad():
            x = torch.linspace(-1, 1, 3 * 64).reshape(1, 3, 8, 8)
            return {"val_mse": float(((net(x) - x.mean(1, keepdim=True) ** 2) ** 2).mean())}

    def score(self, row):
        return -row["val_mse"]

    def state(self):
        return {"drawn": self.drawn}

    def load_state(self, state):
        self.drawn = state["drawn"]


class Payload:
    """An object ``torch.load(weights_only=True)`` refuses to rebuild."""


def _toy_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Conv2d(4, 1, 1))


def _run(out, recipe, *, resume=False, **kw):
    net = _toy_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-4)
    rng = loop.begin(0, 1)
    args = dict(rng=rng, epochs=4, steps_per_epoch=3, lr=1e-2, warmup=2, ema_decay=0.9,
                resume=resume, config={"toy": True}) | kw
    return loop.train(net, opt, recipe, out, **args), opt, rng


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_half_runs_equal_one_full_run(tmp_path):
    full, opt_full, rng_full = _run(tmp_path / "full", ToyRecipe())
    with pytest.raises(Killed):  # killed at the start of the third epoch
        _run(tmp_path / "half", ToyRecipe(kill_at=2 * 3))
    _, state = ck.load_checkpoint(tmp_path / "half" / ck.FILENAME)
    assert state["epoch"] == 2 and state["recipe"] == {"drawn": 6}
    again, opt_again, rng_again = _run(tmp_path / "half", ToyRecipe(), resume=True)

    assert _same_state(full.net.state_dict(), again.net.state_dict())  # weights, BN statistics
    assert _same_state(full.model.state_dict(), again.model.state_dict())  # EMA, best epoch
    sa, sb = opt_full.state_dict(), opt_again.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert _same_state(sa["state"][k], sb["state"][k])
    assert rng_full.bit_generator.state == rng_again.bit_generator.state

    def drop_time(rows):
        return [{k: v for k, v in r.items() if k not in ("epoch_s", "minutes")} for r in rows]

    assert [r["epoch"] for r in again.rows] == [0, 1, 2, 3]
    assert drop_time(again.rows) == drop_time(full.rows)
    assert again.best["epoch"] == full.best["epoch"] and again.best["score"] == full.best["score"]
    assert again.history["stages"] == [{"resumed_at_epoch": 2, "epochs": 4}]
    saved = json.loads((tmp_path / "half" / "history.json").read_text())
    assert [r["epoch"] for r in saved["epochs"]] == [0, 1, 2, 3] and saved["config"] == {"toy": True}


def test_time_budget_stops_training_and_anneals(tmp_path):
    run, _, _ = _run(tmp_path, ToyRecipe(sleep=0.05), epochs=50, steps_per_epoch=20, warmup=0,
                     max_minutes=0.2 / 60)
    assert run.stopped
    assert len(run.rows) == 1 and run.rows[0]["steps"] < 20  # stopped within the first epoch
    # the cosine followed the clock (by steps alone it would still be at ~99 % of 1e-2)
    assert run.rows[0]["lr"] < 0.3 * 1e-2
    _, state = ck.load_checkpoint(tmp_path / ck.FILENAME)
    assert state["epoch"] == 1  # a resumed run starts after the interrupted epoch


def test_checkpoint_is_safetensors_and_json_without_pickle(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    _run(tmp_path, ToyRecipe(), epochs=1)
    path = tmp_path / ck.FILENAME
    assert [p.name for p in tmp_path.glob("checkpoint*")] == [ck.FILENAME]
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")  # safetensors: 8-byte header length, JSON header, data
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == ck.FORMAT
    tensors = load_file(str(path))  # numpy only: no torch, no unpickling
    assert {"model.0.weight", "ema.0.weight", "best.0.weight", "rng.torch"} <= set(tensors)
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in tensors)
    with safe_open(str(path), framework="np") as f:
        state = json.loads(f.metadata()["state"])
    assert state["epoch"] == 1 and state["rng"]["bit_generator"] == "PCG64"
    assert state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert [r["epoch"] for r in state["history"]["epochs"]] == [0]


def test_old_pickled_checkpoints_are_refused_for_resume_but_give_weights(tmp_path):
    net = _toy_net()
    old = {"model": net.state_dict(), "opt": {"state": {}}, "history": [{"epoch": 0, "loss": 1.0}],
           "rng": {"numpy": np.random.default_rng(0).bit_generator.state,
                   "torch": torch.get_rng_state()}, "epoch": 0}
    torch.save(old, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="earlier version cannot be resumed"):
        _run(tmp_path, ToyRecipe(), resume=True)
    assert _same_state(ck.load_weights(tmp_path), net.state_dict())  # --init-from (weights only)
    torch.save({"model": net.state_dict(), "payload": Payload()}, tmp_path / "x.pt")
    with pytest.raises(Exception, match="(?i)weights_only"):
        ck.load_weights(tmp_path / "x.pt")


def test_export_model_writes_onnx_spec_and_card_the_runtime_loads(tmp_path):
    pytest.importorskip("onnx")
    from napari_hemato.core.spec import load_spec
    from napari_hemato.models.onnx_backend import OnnxPredictor
    from napari_hemato.train.common import normalize
    from napari_hemato.train.nets import SigmoidOutputs, SmallUNet

    torch.manual_seed(0)
    net = SmallUNet(widths=(4, 8), head_channels=4).eval()
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    fields = dict(name="toy-nuclei", version="0.0.1", task="nuclei", kind="instances",
                  class_names=["nucleus"], outputs={"foreground": "fg", "distance": "dist"},
                  mpp=0.5, tile=64, max_object_um=10.0, receptive_field_px=20,
                  size_divisor=net.size_divisor, normalization=norm,
                  extra={"training": {"epochs": 1, "seed": 0}})
    example = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    spec = loop.export_model(SigmoidOutputs(net), tmp_path, fields, example=example)
    assert spec == load_spec(tmp_path) and spec.extra["onnx_max_abs_diff"] < 1e-4
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "toy-nuclei" in card and "not a medical device" in card

    image = np.random.default_rng(1).integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)
    out = OnnxPredictor(tmp_path, threads=1).predict(image)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        fg, dist = SigmoidOutputs(net)(normalize(x, norm))
    np.testing.assert_allclose(out["foreground"], fg.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["distance"], dist.numpy(), atol=1e-4)

    (tmp_path / "MODEL_CARD.md").write_text("# hand-written\n")  # a written card is kept
    loop.export_model(SigmoidOutputs(net), tmp_path, fields, example=example)
    assert (tmp_path / "MODEL_CARD.md").read_text() == "# hand-written\n"
