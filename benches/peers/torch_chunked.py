"""PyTorch on the CPU, chunked online softmax over chunks of 8192 rows."""

from torch_common import run

run("cpu", chunked=True)
