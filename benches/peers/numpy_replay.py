"""PSPC-style peer: the exact oracle with numpy, chunked online softmax + matmul expansion.

    python3 benches/peers/numpy_replay.py DIR [EVERY]

Reads DIR/data.npy (N x D, user coordinates), DIR/queries.npy (E x B x D, the states of
E evaluations) and DIR/times.npy (E), evaluates the rectified-flow oracle velocity of each
evaluation in f32 (BLAS sgemm for both products, as the usual numpy/PyTorch loops do) and
writes DIR/numpy_times.csv (eval, seconds) and DIR/numpy_velocity_last.npy. With EVERY > 1
only every EVERY-th evaluation is timed (a reduced replay where the full one is too slow).
"""
import sys
import time

import numpy as np

CHUNK = 4096


def oracle(y, y_sq, x, t):
    alpha, sigma = t, max(1.0 - t, 1e-6)
    two_s2 = 2.0 * sigma * sigma
    b = x.shape[0]
    m = np.full((b, 1), -np.inf, dtype=np.float32)
    l = np.zeros((b, 1), dtype=np.float32)
    acc = np.zeros_like(x)
    for s in range(0, y.shape[0], CHUNK):
        yc, nc = y[s:s + CHUNK], y_sq[s:s + CHUNK]
        # -|x - a y|^2 / (2 s^2) up to a per-query constant: (2 a x.y - a^2 |y|^2) / (2 s^2)
        logits = (x @ yc.T) * np.float32(2.0 * alpha / two_s2) - nc * np.float32(alpha * alpha / two_s2)
        m_new = np.maximum(m, logits.max(axis=1, keepdims=True))
        scale = np.exp(m - m_new)
        p = np.exp(logits - m_new)
        l = l * scale + p.sum(axis=1, keepdims=True)
        acc = acc * scale + p @ yc
        m = m_new
    x1_hat = acc / l
    return (x1_hat - x) / np.float32(sigma)


def main():
    d = sys.argv[1]
    every = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    y = np.load(f"{d}/data.npy").astype(np.float32)
    xs = np.load(f"{d}/queries.npy").astype(np.float32)
    ts = np.load(f"{d}/times.npy")
    y_sq = (y * y).sum(axis=1).astype(np.float32)
    rows = ["eval,seconds"]
    v = None
    for i, (x, t) in enumerate(zip(xs, ts)):
        if i % every:
            continue
        start = time.perf_counter()
        v = oracle(y, y_sq, np.ascontiguousarray(x), float(t))
        rows.append(f"{i},{time.perf_counter() - start:.6f}")
    with open(f"{d}/numpy_times.csv", "w") as f:
        f.write("\n".join(rows) + "\n")
    np.save(f"{d}/numpy_velocity_last.npy", v)
    total = sum(float(r.split(",")[1]) for r in rows[1:])
    print(f"numpy peer: {len(rows) - 1} evaluations, {total:.2f} s (numpy {np.__version__})")


if __name__ == "__main__":
    main()
