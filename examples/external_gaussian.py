#!/usr/bin/env python3
"""The Gaussian field as an external oracleflow field (numpy only).

    oracleflow sample --data npy:data.npy \
        --field "external:python3 examples/external_gaussian.py data.npy"

Protocol (README, "External fields"): per evaluation oracleflow writes three .npy arrays
back to back to our stdin -- x (float32, (B, *sample_shape)), t (float32, (B,)),
y (int64, (B,), the class or -1) -- and reads one .npy from our stdout: the velocity,
float32, x's shape. When stdin closes we exit.

The data comes from a .npy file given on the command line, (N, ...) float32/float16/
float64 values taken as they are (as oracleflow's `npy:` spec takes them), or uint8
pixels scaled to [-1, 1] (as oracleflow scales images). With --labels L.npy (N integers)
a state with class y >= 0 uses the Gaussian fit of that class.

The field is the exact velocity when the data is replaced by its Gaussian fit N(mu, Sigma)
(Sigma divided by N), on the path given by --path (rf: alpha = t, sigma = 1 - t;
vp-cosine: alpha = sin(pi t / 2), sigma = cos(pi t / 2)):
    x1_hat = mu + V diag(alpha l / (alpha^2 l + sigma^2)) V^T (x - alpha mu)
    u      = (alpha' - alpha sigma'/sigma) x1_hat + (sigma'/sigma) x,  sigma >= 1e-6
the same as `--field gaussian`.
"""

import argparse
import sys

import numpy as np

MIN_SIGMA = 1e-6
RELATIVE_EIGEN_FLOOR = 1e-12


class Reader:
    """Only `read`: numpy treats a real pipe as a seekable file (np.fromfile) and fails."""

    def __init__(self, f):
        self.f = f
        self.eof = False

    def read(self, n):
        chunks = []
        while n > 0:
            b = self.f.read(n)
            if not b:
                self.eof = True
                break
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)


class Writer:
    """Only `write`, for the same reason (numpy would write the data with tofile,
    around Python's buffer)."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(b)


def coefs(path, t):
    t = np.asarray(t, dtype=np.float64)
    if path == "rf":
        return t, 1.0 - t, np.ones_like(t), -np.ones_like(t)
    s, c = np.sin(np.pi / 2 * t), np.cos(np.pi / 2 * t)
    return s, c, np.pi / 2 * c, -np.pi / 2 * s


class Fit:
    def __init__(self, y):
        y = y.reshape(len(y), -1).astype(np.float64)
        self.mean = y.mean(axis=0)
        c = y - self.mean
        sigma = c.T @ c / len(y)
        values, self.vectors = np.linalg.eigh(sigma)
        top = max(values.max(), 0.0)
        self.values = np.where(values > RELATIVE_EIGEN_FLOOR * top, values, 0.0)

    def posterior_mean(self, x, alpha, sigma):
        l = self.values[None, :]
        a = alpha[:, None]
        s = sigma[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(
                l == 0.0, 0.0, np.where(s == 0.0, 1.0 / a, a * l / (a * a * l + s * s))
            )
        proj = (x - a * self.mean) @ self.vectors
        return self.mean + (proj * gain) @ self.vectors.T


def load(path):
    a = np.load(path)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 127.5 - 1.0
    return a.astype(np.float64)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help=".npy of the training samples, (N, ...)")
    p.add_argument("--labels", help=".npy of N class labels (class-wise fits)")
    p.add_argument("--path", choices=["rf", "vp-cosine"], default="rf")
    a = p.parse_args()
    data = load(a.data)
    labels = np.load(a.labels).astype(np.int64) if a.labels else None
    fits = {}

    def fit(y):
        if y not in fits:
            fits[y] = Fit(data if y < 0 else data[labels == y])
        return fits[y]

    stdin, stdout = Reader(sys.stdin.buffer), Writer(sys.stdout.buffer)
    while True:
        try:
            x = np.lib.format.read_array(stdin)
        except (ValueError, EOFError):
            if stdin.eof:
                return  # stdin closed: oracleflow is done
            raise
        t = np.lib.format.read_array(stdin)
        y = np.lib.format.read_array(stdin)
        b = x.shape[0]
        xf = x.reshape(b, -1).astype(np.float64)
        alpha, sigma, d_alpha, d_sigma = coefs(a.path, t)
        hat = np.empty_like(xf)
        for c in np.unique(y):
            if c >= 0 and labels is None:
                sys.exit(f"external_gaussian.py: class {c} asked for, but no --labels given")
            m = y == c
            hat[m] = fit(int(c) if c >= 0 else -1).posterior_mean(xf[m], alpha[m], sigma[m])
        s = np.maximum(sigma, MIN_SIGMA)
        u = (d_alpha - alpha * d_sigma / s)[:, None] * hat + (d_sigma / s)[:, None] * xf
        np.lib.format.write_array(stdout, u.astype(np.float32).reshape(x.shape), allow_pickle=False)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
