"""PyTorch on a CUDA GPU, chunked online softmax over chunks of 8192 rows; unavailable without CUDA."""

from torch_common import run

run("cuda", chunked=True)
