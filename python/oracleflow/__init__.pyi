"""Type hints for oracleflow (the native module oracleflow._oracleflow)."""

from typing import Literal, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

_Floats = npt.ArrayLike
_Classes = Union[int, npt.ArrayLike, None]

class Oracle:
    """The exact (closed-form) flow-matching oracle over a dataset.

    data: a --data spec string as on the command line ("embedded", "fashion-mnist",
    "fashion-mnist@2000", "npy:x.npy,y.npy", "gaussian:1000,16", ...) or a numpy array
    (N, ...) of float32, float16 or uint8 (uint8 pixels are mapped to [-1, 1] as
    p / 127.5 - 1, floats taken as they are). labels: integer array (N,), array data only.
    path: "rf" or "vp-cosine". backend: "auto", "gpu", "cpu" or "reference".
    dtype: dataset storage, "f32" or "f16". memory_budget_mib: GPU memory the dataset may
    occupy (MiB); a larger dataset is streamed through the GPU chunk by chunk (the CLI's
    --gpu-memory-mib); no effect on the cpu/reference backends. exact_dense: evaluate every
    sample at every call (the CLI's --exact-dense) instead of exact pruning, which skips
    samples whose weights cannot reach an f32 result (the default).

    Raises ValueError for bad input, FileNotFoundError for a missing data file,
    RuntimeError when the GPU fails.
    """

    def __init__(
        self,
        data: Union[str, npt.NDArray[np.float32], npt.NDArray[np.float16], npt.NDArray[np.uint8]],
        *,
        labels: Optional[npt.ArrayLike] = None,
        path: Literal["rf", "vp-cosine"] = "rf",
        backend: Literal["auto", "gpu", "cpu", "reference"] = "auto",
        dtype: Literal["f32", "f16"] = "f32",
        memory_budget_mib: Optional[int] = None,
        exact_dense: bool = False,
    ) -> None: ...
    @property
    def n(self) -> int:
        """Number of samples N in the dataset."""
    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of one sample, e.g. (1, 28, 28)."""
    @property
    def backend(self) -> str:
        """The backend in use, described."""
    @property
    def class_counts(self) -> dict[int, int]:
        """{label: number of samples}; {} when the dataset has no labels."""
    @property
    def memory_budget_mib(self) -> Optional[int]:
        """The GPU memory budget given (MiB), or None."""
    def velocity(
        self, x: _Floats, t: Union[float, _Floats], *, cls: _Classes = None
    ) -> npt.NDArray[np.float32]:
        """Exact marginal velocity u(x, t) (the flow-matching target), shaped like x.

        x: (B, ...) float32. t: a float in [0, 1] or B times. cls: None, an int, or B
        ints (-1 = unconditional).
        """
    def denoise(
        self, x: _Floats, t: Union[float, _Floats], *, cls: _Classes = None
    ) -> Tuple[npt.NDArray[np.float32], dict[str, np.ndarray]]:
        """Posterior mean x1_hat (shaped like x) and per-query stats, a dict of (B,)
        arrays: top1 (float32), top1_index (int64), entropy (float32), ess (float32),
        posterior_variance (float32, tr Cov_w(y) / D)."""
    def nearest(
        self, x: _Floats, k: int = 2
    ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The k nearest samples of each point: indices (B, k) into the source data and
        Euclidean distances (B, k, exact float64 for the candidates of a float32
        screening pass), nearest first."""

@overload
def sample(
    oracle: Oracle,
    n: int,
    *,
    steps: int = 50,
    solver: Literal["euler", "heun", "rk4"] = "heun",
    shift: float = 1.0,
    seed: int = 0,
    classes: Union[None, int, Sequence[int], Literal["all"]] = None,
    cfg_scale: Optional[float] = None,
    cfg_interval: Optional[Tuple[float, float]] = None,
    return_trajectory: Literal[False] = False,
) -> npt.NDArray[np.float32]: ...
@overload
def sample(
    oracle: Oracle,
    n: int,
    *,
    steps: int = 50,
    solver: Literal["euler", "heun", "rk4"] = "heun",
    shift: float = 1.0,
    seed: int = 0,
    classes: Union[None, int, Sequence[int], Literal["all"]] = None,
    cfg_scale: Optional[float] = None,
    cfg_interval: Optional[Tuple[float, float]] = None,
    return_trajectory: Literal[True],
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Samples (n, ...) with the oracle velocity, as `oracleflow sample` (same bytes for
    the same seed); with return_trajectory=True also x_t at every grid time,
    (steps + 1, n, ...)."""
