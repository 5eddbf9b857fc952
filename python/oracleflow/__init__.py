"""oracleflow: the exact closed-form (oracle) flow-matching velocity over a whole dataset.

    >>> import numpy as np, oracleflow
    >>> oracle = oracleflow.Oracle("embedded")          # 2000 Fashion-MNIST images
    >>> x = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    >>> u = oracle.velocity(x, 0.5)                      # flow-matching target, (4, 1, 28, 28)
    >>> samples = oracleflow.sample(oracle, 8, steps=20)

The engine is the Rust library behind the `oracleflow` command line, with the same
results (same bytes for the same inputs and seed) and the same error messages.

Known issue: an Oracle with backend "auto" or "gpu" opens the Vulkan drivers; Mesa's
(lavapipe, radv) carry their own LLVM, and triton (imported by torch.optim and
torch.compile) crashes when it is loaded after them. Import triton first (create the
torch optimizer before the Oracle, or `import torch._dynamo`), or use backend="cpu".
"""

from ._oracleflow import Oracle, __version__, sample

__all__ = ["Oracle", "sample", "__version__"]
