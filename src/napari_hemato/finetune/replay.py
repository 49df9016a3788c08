"""The replay set shipped with a model: reference embeddings (never images) and a probe.

``replay.npz`` (numpy, read with ``allow_pickle=False``) beside ``model.onnx``:

- ``train_x`` (n, D) float16, ``train_y`` (n,) int: reference training cells, replayed in
  every fine-tune so the head does not forget the reference classes;
- ``val_x``, ``val_y``: the reference validation set, on which a fine-tune must not lose
  more than a point;
- ``probe_x``: the embeddings of :func:`probe_crops`, to check that the replay belongs to
  the model's trunk (a head refit leaves the trunk, and so the replay, valid);
- ``description``: one line (what the reference set is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hemato.core.errors import HematoError

REPLAY = "replay.npz"


def probe_crops(n: int = 4, side: int = 96) -> list[np.ndarray]:
    """Deterministic crops (a dark disc on a light, noisy field) for the trunk check."""
    rng = np.random.default_rng(20261202)
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2
    crops = []
    for _ in range(n):
        img = rng.integers(180, 255, (side, side, 3)).astype(np.uint8)
        img[disc] = rng.integers(60, 140, 3)
        crops.append(img)
    return crops


def probe_embeddings(clf) -> np.ndarray:
    return clf.embed_crops(probe_crops(), [64.0] * 4)[1]


def write_replay(folder: str | Path, clf, *, train_x, train_y, val_x, val_y, description: str) -> Path:
    path = Path(folder) / REPLAY
    np.savez_compressed(path, train_x=np.asarray(train_x, np.float16), train_y=np.asarray(train_y, np.int16),
                        val_x=np.asarray(val_x, np.float16), val_y=np.asarray(val_y, np.int16),
                        probe_x=probe_embeddings(clf).astype(np.float32),
                        description=np.array(description))
    return path


def same_trunk(now: np.ndarray, saved: np.ndarray, tol: float = 0.02) -> bool:
    """Whether the probe's embeddings match the saved ones within ``tol`` relative L2 error.

    Not bit-exact: onnxruntime versions and CPUs (AVX2 / AVX-512) differ in the last
    digits (0.2 % was seen between two onnxruntime builds); another trunk differs by ~100 %.

    Examples
    --------
    >>> x = np.array([[3.0, 4.0]])
    >>> same_trunk(x * 1.001, x), same_trunk(x[:, ::-1], x)
    (True, False)
    """
    now, saved = np.asarray(now, np.float64), np.asarray(saved, np.float64)
    if now.shape != saved.shape:
        return False
    err = np.linalg.norm(now - saved, axis=1) / np.maximum(np.linalg.norm(saved, axis=1), 1e-9)
    return bool((err <= tol).all())


def read_replay(folder: str | Path, what: str) -> tuple[Path, dict]:
    """``(path, arrays)`` of the ``replay.npz`` in ``folder`` (no pickle); a clear error when
    there is none. ``what``: what it holds, for the message ("embeddings", "features")."""
    path = Path(folder) / REPLAY
    if not path.is_file():
        raise HematoError(f"{folder}: no {REPLAY} (the reference {what} a fine-tune replays); "
                          "fine-tune from the bundled model or from a model fine-tuned from it")
    with np.load(path, allow_pickle=False) as z:
        return path, {k: z[k] for k in z.files}


def load_replay(folder: str | Path, clf) -> dict:
    """The replay of the model in ``folder``, checked against ``clf``'s trunk."""
    path, replay = read_replay(folder, "embeddings")
    if not same_trunk(probe_embeddings(clf), replay["probe_x"]):
        raise HematoError(f"{path}: the replay was made with another model's trunk")
    out = {k: replay[k].astype(np.float64) for k in ("train_x", "val_x")}
    out.update({k: replay[k].astype(int) for k in ("train_y", "val_y")})
    out["description"] = str(replay["description"])
    return out
