#!/usr/bin/env python3
"""A PyTorch velocity network behind oracleflow's external-field protocol.

    oracleflow sample --data fashion-mnist \
        --field "external:python3 examples/external_torch.py --checkpoint model.pt" \
        --switch-at 0.3 --then oracle

Protocol (README, "External fields"): per evaluation oracleflow writes x (float32,
(B, *sample_shape)), t (float32, (B,)) and y (int64, (B,), the class or -1 for
unconditional) as three .npy arrays to our stdin, and reads the velocity (float32, x's
shape) as one .npy from our stdout. When stdin closes we exit. Anything printed to stderr
shows in oracleflow's terminal; stdout carries only replies.

Replace `VelocityNet` with your model: any nn.Module taking (x, t, y) and returning the
velocity u(x, t) = d x_t / dt in the same convention as oracleflow (t = 0 noise, t = 1
data; rectified flow x_t = t x1 + (1 - t) x0 by default). `--checkpoint` loads a
state_dict. Needs numpy and torch; not run in CI when torch is absent.
"""

import argparse
import sys

import numpy as np
import torch
from torch import nn


class Reader:
    """Only `read`: numpy treats a real pipe as a seekable file and fails on it."""

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
    """Only `write` (numpy would otherwise write around Python's buffer)."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(b)


class VelocityNet(nn.Module):
    """A stand-in: a small class-conditional MLP on flattened samples."""

    def __init__(self, dim, n_classes=10, hidden=512):
        super().__init__()
        self.n_classes = n_classes
        self.embed = nn.Embedding(n_classes + 1, hidden)  # last row: unconditional
        self.inp = nn.Linear(dim + 1, hidden)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, y):
        b = x.shape[0]
        flat = x.reshape(b, -1)
        cls = torch.where(y < 0, torch.full_like(y, self.n_classes), y)
        h = self.inp(torch.cat([flat, t[:, None]], dim=1)) + self.embed(cls)
        return self.net(h).reshape(x.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="state_dict of VelocityNet (random weights without)")
    p.add_argument("--dim", type=int, default=784, help="values per sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    model = VelocityNet(a.dim).to(a.device).eval()
    if a.checkpoint:
        model.load_state_dict(torch.load(a.checkpoint, map_location=a.device))
    print(f"external_torch.py: model on {a.device}", file=sys.stderr)

    stdin, stdout = Reader(sys.stdin.buffer), Writer(sys.stdout.buffer)
    with torch.no_grad():
        while True:
            try:
                x = np.lib.format.read_array(stdin)
            except (ValueError, EOFError):
                if stdin.eof:
                    return
                raise
            t = np.lib.format.read_array(stdin)
            y = np.lib.format.read_array(stdin)
            u = model(
                torch.from_numpy(x).to(a.device),
                torch.from_numpy(t).to(a.device),
                torch.from_numpy(y).to(a.device),
            )
            out = u.float().cpu().numpy()
            np.lib.format.write_array(stdout, np.ascontiguousarray(out), allow_pickle=False)
            sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
