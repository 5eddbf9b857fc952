"""Shared helpers: the oracle written out in numpy float64 (the definition, nothing shared
with the engine), Fashion-MNIST read straight from its IDX files, the CLI binary."""

import gzip
import os
import pathlib

import numpy as np
import pytest

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
REPO = pathlib.Path(__file__).resolve().parents[2]


def coefs(path, t):
    """(alpha, sigma, d_alpha, d_sigma) of the probability path at times t (array)."""
    t = np.asarray(t, dtype=np.float64)
    if path == "rf":
        return t, 1.0 - t, np.ones_like(t), -np.ones_like(t)
    if path == "vp-cosine":
        h = np.pi / 2
        return np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)
    raise ValueError(path)


def reference(data, x, t, path="rf"):
    """The oracle by its definition, in float64.

    data (N, D), x (B, D), t (B,) with t < 1. Returns velocity (B, D), x1_hat (B, D) and
    the posterior stats: top1, top1_index, entropy, ess and the gap between the two
    largest logits (to tell a true near-tie from a wrong top-1).
    """
    data = np.asarray(data, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in coefs(path, t))
    # logit_i = -|x - alpha y_i|^2 / (2 sigma^2), expanded; float64 keeps the digits.
    d2 = (
        (x * x).sum(1)[:, None]
        - 2 * alpha * (x @ data.T)
        + alpha**2 * (data * data).sum(1)[None, :]
    )
    logits = -d2 / (2 * sigma**2)
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)
    x1_hat = w @ data
    velocity = (d_alpha - alpha * d_sigma / sigma) * x1_hat + (d_sigma / sigma) * x
    top2 = np.sort(logits, axis=1)[:, -2:] if data.shape[0] > 1 else None
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(w > 0, w * np.log(w), 0.0).sum(1)
    stats = {
        "top1": w.max(1),
        "top1_index": w.argmax(1),
        "entropy": entropy,
        "ess": 1.0 / (w * w).sum(1),
        # tr Cov_w(y) / D = (sum w |y|^2 - |x1_hat|^2) / D, in f64
        "posterior_variance": np.maximum(w @ (data * data).sum(1) - (x1_hat * x1_hat).sum(1), 0.0)
        / data.shape[1],
        "gap": (top2[:, 1] - top2[:, 0]) if top2 is not None else np.full(len(x), np.inf),
    }
    return velocity, x1_hat, stats


def rel_err(got, want):
    """Relative L2 error (the measure of the Rust tests)."""
    got = np.asarray(got, dtype=np.float64).ravel()
    want = np.asarray(want, dtype=np.float64).ravel()
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def _idx(path, header):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def fashion_mnist(n, split="train"):
    """The first n Fashion-MNIST images (n, 1, 28, 28) uint8 and labels (n,) int64, read
    from the IDX files of the dataset-fashion-mnist package (skips when it is absent)."""
    prefix = "train" if split == "train" else "t10k"
    images = FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file():
        pytest.skip(f"{images} missing (apt-get install dataset-fashion-mnist)")
    x = _idx(images, 16).reshape(-1, 1, 28, 28)[:n]
    y = _idx(labels, 8)[:n].astype(np.int64)
    return x, y


def pixels(u8):
    """uint8 pixels in [-1, 1] as the engine maps them (p / 127.5 - 1), float64."""
    return u8.astype(np.float64) / 127.5 - 1.0


def cli_binary():
    """The `oracleflow` CLI: $ORACLEFLOW_BIN, else target/release/oracleflow (skip if absent)."""
    path = os.environ.get("ORACLEFLOW_BIN") or str(REPO / "target" / "release" / "oracleflow")
    if not os.access(path, os.X_OK):
        pytest.skip(f"CLI binary {path} not found (cargo build --release, or set ORACLEFLOW_BIN)")
    return path
