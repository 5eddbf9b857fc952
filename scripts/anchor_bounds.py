#!/usr/bin/env python3
"""How tight anchored bounds are (prune::anchor), against projection bounds and the ideal.

A 50-step Euler oracle trajectory of B queries on Fashion-MNIST train (f64 numpy), from
noise at t = 0. From t = 0.28 on, per step: the share of (query, row) pairs whose exact
logit is within ln(2^-31 / N) of the maximum ("ideal"), and the share an exact pruner
must compute under three kinds of upper bound on x . y (each against the true maximum):
  A<l>:  projection bounds, P_l x . P_l y + |x - P_l x| |y - P_l y| (no anchor);
  Bd<l>: anchored on the last step with t <= 0.28, gamma C + P_l r . P_l y + |r - P_l r| |y - P_l y|
         with r = x - gamma c, gamma the least |r - P_l r| (C = c . y kept from that step);
  Bp<l>: the same anchored on the previous step.
Usage: python3 scripts/anchor_bounds.py [B]  (about a minute on 2 cores at B = 64).
"""
import gzip
import os
import sys

import numpy as np

raw = np.frombuffer(gzip.open(os.path.join(os.environ.get('ORACLEFLOW_FASHION_MNIST_DIR', '/usr/share/datasets/fashion-mnist'), 'train-images-idx3-ubyte.gz')).read(), np.uint8, offset=16).reshape(-1,784)
Y = raw/127.5-1.0
mu = Y.mean(0); Yc = Y-mu
rng = np.random.default_rng(0)
sub = Yc[rng.choice(len(Yc), 20000, replace=False)]
w, V = np.linalg.eigh(sub.T@sub)
V = V[:, ::-1]
Z = Yc @ V               # rotated rows
N, D = Z.shape
zn2 = (Z*Z).sum(1)
# tails of rows: |z[l:]|
cum = np.cumsum((Z*Z)[:, ::-1], axis=1)[:, ::-1]  # cum[:, l] = sum_{i>=l} z_i^2
B = int(sys.argv[1]) if len(sys.argv)>1 else 64
steps = 50
eps = rng.standard_normal((B, D))
x = eps.copy()  # rotated coords of (x - t mu) at t=0 is eps @ V but eps isotropic; keep in rotated coords
cut = np.log(2.0**-31 / N)
base_dense = None
levels = [16, 64, 128, 256]
print("   t  ideal  " + " ".join(f"A{l:<5d}" for l in levels) + " " + " ".join(f"Bd{l:<5d}" for l in levels)+ " " + " ".join(f"Bp{l:<5d}" for l in levels))
prev = None
for k in range(steps):
    t = k/steps; a = t; s2 = (1-t)**2
    xy = x @ Z.T
    s = (2*a*xy - a*a*zn2)/(2*s2)
    m = s.max(1, keepdims=True)
    wts = np.exp(s-m); l = wts.sum(1, keepdims=True)
    xhat = (wts @ Z)/l
    if t >= 0.28:
        ideal = (s >= m + cut).mean()
        row = [f"{t:.2f} {ideal:.5f}"]
        def frac(ubxy):
            ub = (2*a*ubxy - a*a*zn2)/(2*s2)
            return (ub >= m + cut).mean()
        for l_ in levels:
            xt = np.sqrt((x[:, l_:]**2).sum(1))[:, None]
            ubxy = x[:, :l_] @ Z[:, :l_].T + xt*np.sqrt(cum[:, l_])[None, :] if l_ < D else None
            row.append(f"{frac(ubxy):.5f}")
        for basis in (base_dense, prev):
            c = basis[0]; C = basis[1]
            for l_ in levels:
                ct = c[:, l_:]; xt_ = x[:, l_:]
                g = (ct*xt_).sum(1)/np.maximum((ct*ct).sum(1), 1e-30)
                r = x - g[:, None]*c
                rt = np.sqrt((r[:, l_:]**2).sum(1))[:, None]
                ubxy = g[:, None]*C + r[:, :l_] @ Z[:, :l_].T + rt*np.sqrt(cum[:, l_])[None, :]
                row.append(f"{frac(ubxy):.5f}")
        print(" ".join(row), flush=True)
    if t <= 0.281:
        base_dense = (x.copy(), xy.copy())
    prev = (x.copy(), xy.copy())
    v = (xhat - x)/(1-t)
    x = x + v/steps
