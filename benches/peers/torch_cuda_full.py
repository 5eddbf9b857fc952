"""PyTorch on a CUDA GPU, whole set at once: matmul expansion + softmax + weighted sum; unavailable without CUDA."""

from torch_common import run

run("cuda", chunked=False)
