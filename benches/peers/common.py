"""Shared plumbing of the peer implementations that `oracleflow bench --peers` runs.

Protocol: `python3 PEER.py --data D.npy --queries Q.npy --t T --reps R --out V.npy`.
D (N, dim) and Q (B, dim) are float32 in user coordinates; the path is rectified flow
(alpha = t, sigma = 1 - t). The script writes the velocity (B, dim) float32 to V.npy and
prints one JSON line: {"seconds": median seconds per evaluation, "note": "..."}.
Exit code 3 (with the reason on stdout as {"unavailable": "..."}) when a library is missing.
"""

import argparse
import json
import sys
import time

import numpy as np


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--t", type=float, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True)
    return p.parse_args()


def load(args):
    """The data y (N, dim), queries x (B, dim), alpha, sigma and |y|^2 per row."""
    y = np.ascontiguousarray(np.load(args.data))
    x = np.ascontiguousarray(np.load(args.queries))
    return y, x, args.t, 1.0 - args.t, (y * y).sum(axis=1)


def unavailable(why):
    print(json.dumps({"unavailable": why}))
    sys.exit(3)


def blas_name():
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy
        return "unknown"


def median_time(f, reps):
    """Median of `reps` timings after one untimed warm-up; returns (seconds, last result)."""
    out = f()
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def finish(args, seconds, velocity, note):
    np.save(args.out, np.ascontiguousarray(velocity, dtype=np.float32))
    print(json.dumps({"seconds": seconds, "note": note}))
