"""PyTorch, chunked online softmax over chunks of 8192 rows."""

from common import finish, load, median_time, parse, unavailable

try:
    import torch
except ImportError:
    unavailable("torch is not importable")
import numpy as np

CHUNK = 8192
args = parse()
y, x, a, s, y_sq = (torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in load(args))


@torch.no_grad()
def evaluate():
    b, d = x.shape
    m = torch.full((b, 1), float("-inf"))
    l = torch.zeros((b, 1))
    acc = torch.zeros((b, d))
    for start in range(0, y.shape[0], CHUNK):
        yc = y[start:start + CHUNK]
        logits = (a * (x @ yc.T) - 0.5 * a * a * y_sq[None, start:start + CHUNK]) / (s * s)
        m_new = torch.maximum(m, logits.max(dim=1, keepdim=True).values)
        scale = torch.exp(m - m_new)
        w = torch.exp(logits - m_new)
        l = l * scale + w.sum(dim=1, keepdim=True)
        acc = acc * scale + w @ yc
        m = m_new
    return (acc / l - x) / s


seconds, v = median_time(evaluate, args.reps)
finish(args, seconds, v.numpy(), f"torch {torch.__version__}, chunks of {CHUNK}")
