"""numpy, chunked online softmax (the PSPC way): the set in chunks of 8192 rows, a running
max, normaliser and weighted sum per query, rescaled when the max grows."""

import numpy as np

from common import blas_name, finish, load, median_time, parse

CHUNK = 8192
args = parse()
y, x, a, s, y_sq = load(args)


def evaluate():
    b, d = x.shape
    m = np.full((b, 1), -np.inf, dtype=np.float32)
    l = np.zeros((b, 1), dtype=np.float32)
    acc = np.zeros((b, d), dtype=np.float32)
    for start in range(0, y.shape[0], CHUNK):
        yc = y[start:start + CHUNK]
        logits = (a * (x @ yc.T) - 0.5 * a * a * y_sq[None, start:start + CHUNK]) / (s * s)
        m_new = np.maximum(m, logits.max(axis=1, keepdims=True))
        scale = np.exp(m - m_new)
        w = np.exp(logits - m_new)
        l = l * scale + w.sum(axis=1, keepdims=True)
        acc = acc * scale + w @ yc
        m = m_new
    return (acc / l - x) / s


seconds, v = median_time(evaluate, args.reps)
finish(args, seconds, v, f"numpy {np.__version__}, {blas_name()}, chunks of {CHUNK}")
