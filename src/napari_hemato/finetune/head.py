"""Refit a linear head on embeddings, anchored: softmax with exact or partial (coarse) labels,
or one logistic output (a heatmap channel).

The loss is the mean weighted negative log-likelihood of each sample's *allowed*
classes (one class for an exact label; the members of a group such as NEU =
SNE + BNE for a coarse one) plus ``l2 / 2 · ||W − W0||²`` (and the same on the
bias): the refit stays near the shipped head, which is what keeps the reference
accuracy. Minimised with L-BFGS (scipy) from ``W0``; numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize


@dataclass
class Head:
    """``probs = softmax((X @ weight.T + bias) / temperature)``."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    temperature: float = 1.0

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) @ self.weight.T + self.bias) / self.temperature

    def probs(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(x))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _logsumexp(z: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def partial_nll(head: Head, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per-sample ``-log Σ_{c allowed} p_c``.

    Examples
    --------
    >>> h = Head(np.eye(2), np.zeros(2))
    >>> np.round(partial_nll(h, np.array([[5.0, 0.0]]), np.array([[True, True]])), 6)
    array([0.])
    """
    z = head.logits(x)
    return _logsumexp(z) - _logsumexp(z, np.asarray(allowed, bool))


def fit_head(x: np.ndarray, allowed: np.ndarray, init: Head, *, sample_weight=None,
             l2: float = 1e-2, max_iter: int = 300) -> Head:
    """The head minimising the weighted partial-label NLL + ``l2/2 ||(W, b) − (W0, b0)||²``.

    ``x`` (N, D) embeddings, ``allowed`` (N, C) booleans (each row at least one True),
    ``sample_weight`` (N,) (default 1; normalised to sum 1). The temperature is kept.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (50, 2)) + [3, 0], rng.normal(0, 1, (50, 2)) - [3, 0]]
    >>> allowed = np.r_[np.tile([True, False], (50, 1)), np.tile([False, True], (50, 1))]
    >>> h = fit_head(x, allowed, Head(np.zeros((2, 2)), np.zeros(2)), l2=1e-3)
    >>> float((h.probs(x).argmax(1) == allowed.argmax(1)).mean()) > 0.95
    True
    """
    x = np.asarray(x, np.float64)
    allowed = np.asarray(allowed, bool)
    if x.ndim != 2 or allowed.shape != (len(x), init.weight.shape[0]):
        raise ValueError(f"x {x.shape} and allowed {allowed.shape} do not match the head "
                         f"{init.weight.shape}")
    if not allowed.any(1).all():
        raise ValueError("every sample needs at least one allowed class")
    return _fit_softmax(x, lambda p: _restricted(p, allowed), init, sample_weight, l2, max_iter,
                        nll_of=lambda z: _logsumexp(z) - _logsumexp(z, allowed))


def _restricted(p: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    q = np.where(allowed, p, 0.0)
    return q / q.sum(1, keepdims=True)


def fit_soft_head(x: np.ndarray, target: np.ndarray, init: Head, *, sample_weight=None,
                  l2: float = 1e-2, max_iter: int = 300) -> Head:
    """:func:`fit_head` with soft targets: the weighted cross-entropy ``-Σ_c target_c log p_c``
    (rows of ``target`` (N, C) sum to 1; a one-hot row is an exact label, a row of the shipped
    head's own probabilities replays it) + ``l2/2 ||(W, b) − (W0, b0)||²``.

    Examples
    --------
    >>> h0 = Head(np.zeros((2, 1)), np.zeros(2))
    >>> h = fit_soft_head(np.zeros((4, 1)), np.tile([0.75, 0.25], (4, 1)), h0, l2=0.0)
    >>> np.round(h.probs(np.zeros((1, 1))), 3).tolist()
    [[0.75, 0.25]]
    """
    x = np.asarray(x, np.float64)
    target = np.asarray(target, np.float64)
    if x.ndim != 2 or target.shape != (len(x), init.weight.shape[0]):
        raise ValueError(f"x {x.shape} and target {target.shape} do not match the head "
                         f"{init.weight.shape}")
    return _fit_softmax(x, lambda p: target, init, sample_weight, l2, max_iter,
                        nll_of=lambda z: _logsumexp(z) - (target * z).sum(1))


def _fit_softmax(x, q_of, init: Head, sample_weight, l2: float, max_iter: int, *, nll_of) -> Head:
    """Minimise ``w · nll_of(z) + l2/2 ||θ − θ0||²`` whose gradient in the logits is ``p − q_of(p)``."""
    w = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w = w / w.sum()
    n_c, n_d = init.weight.shape
    theta0 = np.concatenate([init.weight.ravel(), init.bias.ravel()]).astype(np.float64)
    t = float(init.temperature)

    def loss_grad(theta):
        weight, bias = theta[: n_c * n_d].reshape(n_c, n_d), theta[n_c * n_d :]
        z = (x @ weight.T + bias) / t
        p = _softmax(z)
        dz = (p - q_of(p)) * w[:, None] / t
        diff = theta - theta0
        loss = float(w @ nll_of(z)) + 0.5 * l2 * float(diff @ diff)
        grad = np.concatenate([(dz.T @ x).ravel(), dz.sum(0)]) + l2 * diff
        return loss, grad

    res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": 1e-7})
    theta = res.x
    return Head(theta[: n_c * n_d].reshape(n_c, n_d).astype(np.float32),
                theta[n_c * n_d :].astype(np.float32), t)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + e^-z)``, computed without overflow (as ``(1 + tanh(z/2)) / 2``)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))


def logit(p: float) -> float:
    """``log(p / (1 - p))``: a detection threshold as the ``offset`` of :func:`fit_binary_head`."""
    return float(np.log(p / (1 - p)))


@dataclass
class BinaryHead:
    """``logit = x @ weight + bias`` (one output: a heatmap channel, a detector's score)."""

    weight: np.ndarray  # (D,)
    bias: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight + self.bias


def fit_binary_head(x: np.ndarray, y: np.ndarray, init: BinaryHead, *, sample_weight=None,
                    l2: float = 1e-2, offset: float = 0.0, max_iter: int = 300) -> BinaryHead:
    """The head minimising the weighted logistic loss of ``logit − offset`` + ``l2/2 ||(w, b) − (w0, b0)||²``.

    ``x`` (N, D), ``y`` (N,) in {0, 1}; ``offset`` puts the loss's boundary at a detection
    threshold (``logit(threshold)``) instead of 0.5. ``sample_weight`` is normalised to sum 1.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (50, 2)) + [2, 0], rng.normal(0, 1, (50, 2)) - [2, 0]]
    >>> y = np.r_[np.ones(50), np.zeros(50)]
    >>> h = fit_binary_head(x, y, BinaryHead(np.zeros(2), 0.0), l2=1e-3)
    >>> float(((h.logits(x) > 0) == y).mean()) > 0.95
    True
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (len(x),) or x.shape[1] != len(init.weight):
        raise ValueError(f"x {x.shape} and y {y.shape} do not match the head ({len(init.weight)},)")
    w = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w = w / w.sum()
    theta0 = np.r_[np.asarray(init.weight, np.float64), float(init.bias)]

    def loss_grad(theta):
        z = x @ theta[:-1] + theta[-1] - offset
        # log(1 + e^z) - y z, stably; its derivative is sigmoid(z) - y
        nll = np.logaddexp(0.0, z) - y * z
        dz = (sigmoid(z) - y) * w
        diff = theta - theta0
        return float(w @ nll) + 0.5 * l2 * float(diff @ diff), np.r_[dz @ x, dz.sum()] + l2 * diff

    res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": 1e-8})
    return BinaryHead(res.x[:-1].copy(), float(res.x[-1]))
