"""oracleflow.Oracle (velocity, denoise, nearest) against numpy float64 implementations.

Tolerances, as in the Rust suite (tests/oracle_backends.rs): relative L2 error of the
velocity and of x1_hat against float64 at most 1e-4 for t <= 0.95. The engine computes in
float32; its logits c_dot x.y - c_norm |y|^2 carry about eps |x||y| sqrt(D) of rounding,
which moves near-tied posterior weights. Stats: 1e-2 relative (absolute below 1, e.g. an
entropy near 0); the top-1 index must match except at a true near-tie (top-2 logit gap
below that rounding bound). Nearest: distances to 1e-5 (the engine centres the data in
float32), indices equal where the brute-force ranking has a clear gap.
"""

import numpy as np
import pytest

import oracleflow
from conftest import coefs, fashion_mnist, pixels, reference, rel_err

TOL = 1e-4
STATS_TOL = 1e-2


def random_data(n=400, shape=(3, 4, 4), classes=5, seed=0):
    rng = np.random.default_rng(seed)
    # Clustered data, so that the posterior goes from broad to one-hot along the path.
    centres = rng.standard_normal((classes,) + shape).astype(np.float32)
    labels = rng.integers(0, classes, n)
    data = centres[labels] + 0.5 * rng.standard_normal((n,) + shape).astype(np.float32)
    return data.astype(np.float32), labels


def noisy_queries(data64, t, path, seed):
    """x_t = alpha x1 + sigma eps for training samples x1 (where the oracle is used)."""
    rng = np.random.default_rng(seed)
    b = len(t)
    x1 = data64[rng.integers(0, len(data64), b)]
    alpha, sigma, _, _ = coefs(path, t)
    return (alpha[:, None] * x1 + sigma[:, None] * rng.standard_normal(x1.shape)).astype(np.float32)


def check_stats(stats, want, x, data64, t, path):
    b = len(x)
    for key in ("top1", "top1_index", "entropy", "ess"):
        assert stats[key].shape == (b,), key
    assert stats["top1_index"].dtype == np.int64
    # The posterior variance carries f32 cancellation (sum w |y|^2 - |x1_hat|^2): 1e-3
    # relative plus an absolute floor of 1e-4 of the data's scale.
    pv, pv_ref = stats["posterior_variance"].astype(np.float64), want["posterior_variance"]
    scale = (data64**2).sum(1).mean() / data64.shape[1]
    assert np.all(np.abs(pv - pv_ref) <= 1e-3 * pv_ref + 1e-4 * scale), (pv, pv_ref)
    for key in ("top1", "entropy", "ess"):
        got, ref = stats[key].astype(np.float64), want[key]
        assert np.all(np.abs(got - ref) <= STATS_TOL * np.maximum(np.abs(ref), 1.0)), (key, got, ref)
    alpha, sigma, _, _ = coefs(path, t)
    c_dot = alpha / sigma**2
    y_max = np.sqrt((data64**2).sum(1)).max()
    x_norm = np.sqrt((x.astype(np.float64) ** 2).sum(1))
    rounding = 1e-5 * (c_dot * (x_norm + y_max) * y_max * np.sqrt(data64.shape[1]) + 1)
    clear = want["gap"] > rounding
    assert np.array_equal(stats["top1_index"][clear], want["top1_index"][clear])


@pytest.fixture(scope="module")
def random_oracle():
    data, labels = random_data()
    return oracleflow.Oracle(data, labels=labels, backend="cpu"), data, labels


@pytest.mark.parametrize("path", ["rf", "vp-cosine"])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.9, 0.95])
def test_velocity_and_denoise_random(path, t):
    data, _ = random_data()
    oracle = oracleflow.Oracle(data, path=path, backend="cpu")
    data64 = data.reshape(len(data), -1).astype(np.float64)
    ts = np.full(16, t)
    x = noisy_queries(data64, ts, path, seed=1).reshape((16,) + data.shape[1:])
    want_u, want_hat, want_stats = reference(data64, x.reshape(16, -1), ts, path)

    u = oracle.velocity(x, t)
    assert u.shape == x.shape and u.dtype == np.float32
    assert rel_err(u, want_u) <= TOL
    x1_hat, stats = oracle.denoise(x, t)
    assert x1_hat.shape == x.shape and x1_hat.dtype == np.float32
    assert rel_err(x1_hat, want_hat) <= TOL
    check_stats(stats, want_stats, x.reshape(16, -1), data64, ts, path)


def test_per_query_times_and_layouts(random_oracle):
    oracle, data, _ = random_oracle
    data64 = data.reshape(len(data), -1).astype(np.float64)
    ts = np.linspace(0.02, 0.95, 24)
    x = noisy_queries(data64, ts, "rf", seed=2)
    want_u, _, _ = reference(data64, x, ts, "rf")
    # (B, D) queries, times as (B,) float64, (B, 1) float32 or a list: all one result.
    u = oracle.velocity(x, ts)
    assert u.shape == x.shape
    assert rel_err(u, want_u) <= TOL
    assert np.array_equal(oracle.velocity(x, ts.astype(np.float32)[:, None]), u)
    assert np.array_equal(oracle.velocity(x, list(ts.astype(np.float32))), u)
    # One time: a float, a numpy scalar or a 0-d array; one query: a (1,) array.
    u5 = oracle.velocity(x, 0.5)
    for t in (np.float32(0.5), np.array(0.5), np.full(24, 0.5)):
        assert np.array_equal(oracle.velocity(x, t), u5)
    # Bytes depend on the batch (the CPU GEMM takes another path for one row), so a lone
    # query agrees to float32 rounding, not bit for bit.
    assert rel_err(oracle.velocity(x[:1], np.array([0.5])), u5[:1]) <= 1e-6
    # A Fortran-ordered or strided view is read in C order (copied), float64 converted.
    xf = np.asfortranarray(x)
    assert np.array_equal(oracle.velocity(xf, ts), u)
    x2 = np.repeat(x, 2, axis=0)[::2]
    assert np.array_equal(oracle.velocity(x2, ts), u)
    assert np.array_equal(oracle.velocity(x.astype(np.float64), ts), u)


def test_class_conditional(random_oracle):
    oracle, data, labels = random_oracle
    data64 = data.reshape(len(data), -1).astype(np.float64)
    ts = np.full(12, 0.6)
    x = noisy_queries(data64, ts, "rf", seed=3)
    for c in (0, 3):
        rows = np.flatnonzero(labels == c)
        want_u, want_hat, want_stats = reference(data64[rows], x, ts, "rf")
        assert rel_err(oracle.velocity(x, 0.6, cls=c), want_u) <= TOL
        x1_hat, stats = oracle.denoise(x, 0.6, cls=c)
        assert rel_err(x1_hat, want_hat) <= TOL
        # top1_index is an index into the whole source array.
        want_stats["top1_index"] = rows[want_stats["top1_index"]]
        check_stats(stats, want_stats, x, data64[rows], ts, "rf")

    # Per-query classes, -1 = unconditional: each query as if asked alone.
    cls = np.array([0, 1, -1, 2, 4, 0, -1, 3, 1, 2, 4, 0])
    u = oracle.velocity(x, ts, cls=cls)
    for q, c in enumerate(cls):
        rows = np.flatnonzero(labels == c) if c >= 0 else np.arange(len(data))
        want_u, _, _ = reference(data64[rows], x[q : q + 1], ts[q : q + 1], "rf")
        assert rel_err(u[q], want_u) <= TOL, q


def test_fashion_mnist_uint8_against_f64():
    images, labels = fashion_mnist(2000)
    oracle = oracleflow.Oracle(images, labels=labels, backend="cpu")
    assert (oracle.n, oracle.shape) == (2000, (1, 28, 28))
    data64 = pixels(images).reshape(2000, -1)
    # Queries from held-out (test-set) images on the path, as in training.
    test_images, _ = fashion_mnist(48, "test")
    rng = np.random.default_rng(4)
    ts = np.repeat([0.05, 0.3, 0.6, 0.9], 12)
    alpha, sigma, _, _ = coefs("rf", ts)
    x = alpha[:, None] * pixels(test_images).reshape(48, -1) + sigma[:, None] * rng.standard_normal((48, 784))
    x = x.astype(np.float32).reshape(48, 1, 28, 28)
    want_u, want_hat, want_stats = reference(data64, x.reshape(48, -1), ts, "rf")
    assert rel_err(oracle.velocity(x, ts), want_u) <= TOL
    x1_hat, stats = oracle.denoise(x, ts)
    assert rel_err(x1_hat, want_hat) <= TOL
    check_stats(stats, want_stats, x.reshape(48, -1), data64, ts, "rf")


def test_uint8_array_is_the_spec():
    """A uint8 array is mapped to [-1, 1] exactly as the CLI maps the same images."""
    images, labels = fashion_mnist(2000)
    from_array = oracleflow.Oracle(images, labels=labels, backend="cpu")
    from_spec = oracleflow.Oracle("fashion-mnist@2000", backend="cpu")
    assert from_array.class_counts == from_spec.class_counts
    x = np.random.default_rng(5).standard_normal((8, 1, 28, 28)).astype(np.float32)
    for t, cls in [(0.3, None), (0.8, 7)]:
        assert np.array_equal(from_array.velocity(x, t, cls=cls), from_spec.velocity(x, t, cls=cls))


def test_f16_storage():
    """f16 storage is the exact oracle of the f16-rounded (centred) dataset."""
    data, _ = random_data(n=300, shape=(20,), seed=6)
    data16 = data.astype(np.float16)
    for source in (data, data16):
        oracle = oracleflow.Oracle(source, dtype="f16", backend="cpu")
        src64 = source.astype(np.float64)
        mean = src64.mean(0).astype(np.float32).astype(np.float64)
        stored = (src64 - mean).astype(np.float16).astype(np.float64) + mean
        ts = np.full(10, 0.7)
        x = noisy_queries(stored, ts, "rf", seed=7)
        want_u, want_hat, _ = reference(stored, x, ts, "rf")
        assert rel_err(oracle.velocity(x, 0.7), want_u) <= TOL
        assert rel_err(oracle.denoise(x, 0.7)[0], want_hat) <= TOL


@pytest.mark.parametrize("k", [1, 2, 5])
def test_nearest_against_brute_force(random_oracle, k):
    oracle, data, _ = random_oracle
    data64 = data.reshape(len(data), -1).astype(np.float64)
    rng = np.random.default_rng(8)
    # Points far from, near to and exactly at training samples (distance 0).
    x = np.concatenate(
        [
            rng.standard_normal((6, data64.shape[1])) * 2,
            data64[rng.integers(0, len(data), 6)] + 0.01 * rng.standard_normal((6, data64.shape[1])),
            data64[[3, 77, 150]],
        ]
    ).astype(np.float32)
    idx, dist = oracle.nearest(x.reshape((len(x),) + data.shape[1:]), k=k)
    assert idx.shape == dist.shape == (len(x), k)
    assert idx.dtype == np.int64 and dist.dtype == np.float64
    d = np.sqrt(((x.astype(np.float64)[:, None, :] - data64[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    want = np.take_along_axis(d, order, 1)
    assert np.allclose(dist, want[:, :k], rtol=0, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)
    # Indices: equal wherever the ranking is not a near-tie.
    gaps = np.diff(want[:, : k + 1], axis=1)
    for q in range(len(x)):
        for j in range(k):
            clear = (j == 0 or gaps[q, j - 1] > 1e-5) and gaps[q, j] > 1e-5
            if clear:
                assert idx[q, j] == order[q, j], (q, j)
    assert np.array_equal(idx[-3:, 0], [3, 77, 150])
    assert np.all(dist[-3:, 0] < 1e-5)


def test_nearest_real_data():
    images, labels = fashion_mnist(2000)
    oracle = oracleflow.Oracle(images, labels=labels, backend="cpu")
    data64 = pixels(images).reshape(2000, -1)
    test_images, _ = fashion_mnist(20, "test")
    x = pixels(test_images).astype(np.float32)
    idx, dist = oracle.nearest(x, k=3)
    d = np.sqrt(((x.reshape(20, 1, -1).astype(np.float64) - data64[None]) ** 2).sum(-1))
    want = np.sort(d, axis=1)[:, :3]
    assert np.allclose(dist, want, rtol=0, atol=1e-5)
    assert np.allclose(np.take_along_axis(d, idx, 1), want, rtol=0, atol=1e-5)


def test_properties(random_oracle):
    oracle, data, labels = random_oracle
    assert oracle.n == len(data)
    assert oracle.shape == data.shape[1:]
    assert oracle.backend.startswith("cpu")
    assert oracle.class_counts == {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    assert oracle.memory_budget_mib is None
    assert "Oracle(" in repr(oracle)
    assert oracleflow.Oracle(data, memory_budget_mib=64, backend="cpu").memory_budget_mib == 64
    unlabelled = oracleflow.Oracle(data, backend="cpu")
    assert unlabelled.class_counts == {}


def test_reference_backend_matches(random_oracle):
    """backend="reference" is the engine's own f64 definition: it agrees with numpy's."""
    _, data, _ = random_oracle
    oracle = oracleflow.Oracle(data, backend="reference")
    data64 = data.reshape(len(data), -1).astype(np.float64)
    ts = np.full(8, 0.8)
    x = noisy_queries(data64, ts, "rf", seed=9)
    want_u, _, _ = reference(data64, x, ts, "rf")
    assert rel_err(oracle.velocity(x, 0.8), want_u) <= 1e-6


@pytest.mark.parametrize("t", [0.5, 0.9, 0.99])
def test_exact_dense_and_pruned_agree(t):
    """exact_dense=True (the plain pass) and the default (exact pruning) both give the f64
    velocity; the backend says which runs."""
    rng = np.random.default_rng(3)
    centres = rng.uniform(-1, 1, size=(20, 64))
    data = (centres[rng.integers(0, 20, 2000)] + 0.05 * rng.standard_normal((2000, 64)))
    data = data.astype(np.float32).reshape(2000, 4, 4, 4)
    pruned = oracleflow.Oracle(data, backend="cpu")
    dense = oracleflow.Oracle(data, backend="cpu", exact_dense=True)
    assert "exact pruning" in pruned.backend and "exact dense" in dense.backend
    data64 = data.reshape(len(data), -1).astype(np.float64)
    ts = np.full(12, t)
    x = noisy_queries(data64, ts, "rf", seed=5).reshape((12,) + data.shape[1:])
    want_u, _, _ = reference(data64, x.reshape(12, -1), ts, "rf")
    u_pruned, u_dense = pruned.velocity(x, t), dense.velocity(x, t)
    assert rel_err(u_dense, want_u) <= TOL
    assert rel_err(u_pruned, want_u) <= TOL
    assert rel_err(u_pruned, u_dense.astype(np.float64)) <= 1e-5
