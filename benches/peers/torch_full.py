"""PyTorch, whole set at once: torch.cdist-free matmul expansion + softmax + weighted sum."""

from common import finish, load, median_time, parse, unavailable

try:
    import torch
except ImportError:
    unavailable("torch is not importable")
import numpy as np

args = parse()
y, x, a, s, y_sq = (torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in load(args))


@torch.no_grad()
def evaluate():
    logits = (a * (x @ y.T) - 0.5 * a * a * y_sq[None, :]) / (s * s)
    w = torch.softmax(logits, dim=1)
    return (w @ y - x) / s


seconds, v = median_time(evaluate, args.reps)
finish(args, seconds, v.numpy(), f"torch {torch.__version__}, {torch.get_num_threads()} threads")
