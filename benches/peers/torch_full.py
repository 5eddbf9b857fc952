"""PyTorch on the CPU, whole set at once: matmul expansion + softmax + weighted sum."""

from torch_common import run

run("cpu", chunked=False)
