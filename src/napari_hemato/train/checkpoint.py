"""Training checkpoints without pickle (torch + safetensors; ``train`` extra).

One file, ``checkpoint.safetensors``: every tensor (model, EMA and best
weights, optimizer moments and steps, the torch RNG state) is a safetensors
tensor, and everything else (epoch, elapsed time, history, optimizer
hyper-parameters, the numpy RNG state, the trainer's own state such as the
mitosis hard negatives) is one JSON document in the file's metadata under
``"state"``. It loads with ``safetensors`` and ``json`` alone, and it is
written under a temporary name and renamed, so a kill never leaves half a file.

Checkpoints of earlier versions (``checkpoint.pt``, pickled) are not resumed;
:func:`load_weights` still reads their ``"model"`` weights with
``torch.load(weights_only=True)`` (no code runs) for ``--init-from``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "napari-hemato-checkpoint/1"
FILENAME = "checkpoint.safetensors"
LEGACY_FILENAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write ``tensors`` and the JSON-able ``state`` atomically to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "state": json.dumps(state, allow_nan=True)}
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(flat, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, state)`` of a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    ValueError
        For a pickled ``checkpoint.pt`` of an earlier version, or a file that
        is not a checkpoint of this format.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix == ".pt":
        raise ValueError(f"{path}: a pickled checkpoint of an earlier version cannot be resumed; "
                         f"start a new run (--init-from {path.name} takes its weights)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    return tensors, json.loads(meta["state"])


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with keys ``prefix.key``."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors stored under ``prefix.`` (prefix removed)."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint: this format, or the ``"model"`` of an old ``.pt``.

    An old ``checkpoint.pt`` is read with ``torch.load(weights_only=True)``,
    which refuses anything but tensors and plain containers.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME if (path / FILENAME).exists() else path / LEGACY_FILENAME
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    tensors, _ = load_checkpoint(path)
    return unprefixed("model", tensors)


# -- optimizer state <-> tensors + JSON ---------------------------------------------
def optimizer_to(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, json)`` of an optimizer's ``state_dict``."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    """Load what :func:`optimizer_to` produced into ``opt`` (tuples restored)."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in saved["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    groups = []
    for mine, g in zip(opt.param_groups, saved["param_groups"], strict=True):
        groups.append({k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in g.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})
