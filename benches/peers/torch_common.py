"""The PyTorch peers' two methods, on the CPU or on a CUDA device.

Whole set: one matmul expansion of the logits, softmax, weighted sum (what ad-hoc scripts
do while it fits in memory). Chunked: online softmax over chunks of rows (what they do
when it does not). On CUDA the data and |y|^2 are on the device before timing, as a
script would keep them; each timed evaluation takes the queries from the host and returns
the velocity to it (which also waits for the device), as ours does. TF32 stays off
(PyTorch's default for matmul), so the peer is an exact f32 one.
"""

from common import finish, load, median_time, parse, unavailable

try:
    import torch
except ImportError:
    unavailable("torch is not importable")

CHUNK = 8192


def device_or_exit(name):
    if name == "cuda" and not torch.cuda.is_available():
        unavailable(f"torch {torch.__version__} sees no CUDA device")
    return torch.device(name)


def run(device_name, chunked):
    device = device_or_exit(device_name)
    torch.backends.cuda.matmul.allow_tf32 = False
    args = parse()
    y, x, a, s, y_sq = load(args)
    y = torch.from_numpy(y).to(device)
    y_sq = torch.from_numpy(y_sq).to(device)

    @torch.no_grad()
    def whole(xd):
        logits = (a * (xd @ y.T) - 0.5 * a * a * y_sq[None, :]) / (s * s)
        w = torch.softmax(logits, dim=1)
        return (w @ y - xd) / s

    @torch.no_grad()
    def online(xd):
        b, d = xd.shape
        m = torch.full((b, 1), float("-inf"), device=device)
        l = torch.zeros((b, 1), device=device)
        acc = torch.zeros((b, d), device=device)
        for start in range(0, y.shape[0], CHUNK):
            yc = y[start:start + CHUNK]
            logits = (a * (xd @ yc.T) - 0.5 * a * a * y_sq[None, start:start + CHUNK]) / (s * s)
            m_new = torch.maximum(m, logits.max(dim=1, keepdim=True).values)
            scale = torch.exp(m - m_new)
            w = torch.exp(logits - m_new)
            l = l * scale + w.sum(dim=1, keepdim=True)
            acc = acc * scale + w @ yc
            m = m_new
        return (acc / l - xd) / s

    method = online if chunked else whole

    def evaluate():
        return method(torch.from_numpy(x).to(device)).cpu()

    seconds, v = median_time(evaluate, args.reps)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} threads"
    how = f"chunks of {CHUNK}" if chunked else "whole set"
    finish(args, seconds, v.numpy(), f"torch {torch.__version__}, {where}, {how}")
