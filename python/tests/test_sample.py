"""oracleflow.sample against a numpy float64 sampler written from the definition.

The engine integrates in float64 with float32 oracle evaluations; the numpy sampler here
integrates in float64 with float64 velocities from the same starting noise (x_t at t = 0,
taken from the returned trajectory). Tolerance: relative L2 error 1e-3 over the whole
trajectory: per-evaluation errors are ~1e-5 (see test_oracle.py) and the flow contracts
onto the data near t = 1, so they do not grow much over 10-20 steps.
"""

import numpy as np
import pytest

import oracleflow
from conftest import reference, rel_err

SAMPLE_TOL = 1e-3


def grid(steps, shift):
    u = np.arange(steps + 1) / steps
    return np.clip(shift * u / (1 + (shift - 1) * u), 0.0, 1.0)


def field(data, labels, x, t, classes, guidance):
    """(velocity, x1_hat) at one time, per sample class (None = all rows), guided."""
    u = np.empty_like(x)
    hat = np.empty_like(x)
    ts = np.full(len(x), t)
    for q, c in enumerate(classes):
        rows = np.arange(len(data)) if c is None else np.flatnonzero(labels == c)
        uq, hq, _ = reference(data[rows], x[q : q + 1], ts[q : q + 1])
        if guidance is not None and c is not None and guidance[1] <= t <= guidance[2]:
            uu, hu, _ = reference(data, x[q : q + 1], ts[q : q + 1])
            w = guidance[0]
            uq, hq = uu + w * (uq - uu), hu + w * (hq - hu)
        u[q], hat[q] = uq[0], hq[0]
    return u, hat


def integrate(data, labels, x0, times, solver, classes, guidance=None):
    """The sampler of src/sample.rs in numpy: returns x at every grid time."""
    f = lambda x, t: field(data, labels, x, t, classes, guidance)  # noqa: E731
    xs = [x0]
    x = x0
    for t0, t1 in zip(times[:-1], times[1:]):
        k1, hat = f(x, t0)
        h = t1 - t0
        if t1 >= 1.0:
            x = hat  # the last step returns the posterior mean (no division by sigma = 0)
        elif solver == "euler":
            x = x + h * k1
        elif solver == "heun":
            k2, _ = f(x + h * k1, t1)
            x = x + 0.5 * h * (k1 + k2)
        else:
            tm = t0 + 0.5 * h
            k2, _ = f(x + 0.5 * h * k1, tm)
            k3, _ = f(x + 0.5 * h * k2, tm)
            k4, _ = f(x + h * k3, t1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        xs.append(x)
    return np.stack(xs)


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(0)
    centres = 2 * rng.standard_normal((4, 24))
    labels = rng.integers(0, 4, 300)
    data = (centres[labels] + 0.7 * rng.standard_normal((300, 24))).astype(np.float32)
    oracle = oracleflow.Oracle(data.reshape(300, 4, 6), labels=labels, backend="cpu")
    return oracle, data.astype(np.float64), labels


@pytest.mark.parametrize(
    "solver,steps,shift", [("euler", 20, 1.0), ("heun", 12, 0.5), ("rk4", 8, 2.0)]
)
def test_sample_against_numpy(clustered, solver, steps, shift):
    oracle, data, labels = clustered
    samples, traj = oracleflow.sample(
        oracle, 10, steps=steps, solver=solver, shift=shift, seed=3, return_trajectory=True
    )
    assert samples.shape == (10, 4, 6) and samples.dtype == np.float32
    assert traj.shape == (steps + 1, 10, 4, 6)
    assert np.array_equal(traj[-1], samples)
    x0 = traj[0].reshape(10, -1).astype(np.float64)
    want = integrate(data, labels, x0, grid(steps, shift), solver, [None] * 10)
    assert rel_err(traj.reshape(steps + 1, 10, -1), want) <= SAMPLE_TOL
    # Without the trajectory: the same samples.
    assert np.array_equal(
        oracleflow.sample(oracle, 10, steps=steps, solver=solver, shift=shift, seed=3), samples
    )


def test_noise_depends_on_seed_and_index_only(clustered):
    oracle, _, _ = clustered
    _, a = oracleflow.sample(oracle, 300, steps=1, seed=11, return_trajectory=True)
    _, b = oracleflow.sample(oracle, 5, steps=1, seed=11, return_trajectory=True)
    _, c = oracleflow.sample(oracle, 5, steps=1, seed=12, return_trajectory=True)
    assert np.array_equal(a[0, :5], b[0])
    assert not np.array_equal(b[0], c[0])
    noise = a[0].astype(np.float64)
    # Standard normal: 7200 values, so mean and std within ~5 standard errors.
    assert abs(noise.mean()) < 0.06 and abs(noise.std() - 1) < 0.05


def test_classes_and_guidance(clustered):
    oracle, data, labels = clustered
    classes = [2, 0, 3, 1, 2, 1]
    for guidance in (None, (2.0, 0.2, 0.8)):
        kwargs = {} if guidance is None else {"cfg_scale": guidance[0], "cfg_interval": guidance[1:]}
        samples, traj = oracleflow.sample(
            oracle, 6, steps=10, seed=5, classes=classes, return_trajectory=True, **kwargs
        )
        x0 = traj[0].reshape(6, -1).astype(np.float64)
        want = integrate(data, labels, x0, grid(10, 1.0), "heun", classes, guidance)
        assert rel_err(traj.reshape(11, 6, -1), want) <= SAMPLE_TOL
    # Class-conditional samples memorize a training sample of their class.
    idx, _ = oracle.nearest(samples)
    assert np.array_equal(labels[idx[:, 0]], classes)

    # "all": sample i of the i-th class present, in turn; an int: all of one class.
    everything = oracleflow.sample(oracle, 8, steps=10, classes="all")
    idx, _ = oracle.nearest(everything, k=1)
    assert np.array_equal(labels[idx[:, 0]], np.arange(8) % 4)
    assert np.array_equal(
        oracleflow.sample(oracle, 3, steps=10, classes=1),
        oracleflow.sample(oracle, 3, steps=10, classes=[1, 1, 1]),
    )


def test_vp_cosine_path():
    rng = np.random.default_rng(1)
    data = rng.standard_normal((200, 8)).astype(np.float32)
    oracle = oracleflow.Oracle(data, path="vp-cosine", backend="cpu")
    samples, traj = oracleflow.sample(oracle, 6, steps=15, solver="heun", return_trajectory=True)
    times = grid(15, 1.0)

    def f(x, t):
        u, hat, _ = reference(data, x, np.full(len(x), t), "vp-cosine")
        return u, hat

    x = traj[0].astype(np.float64)
    xs = [x]
    for t0, t1 in zip(times[:-1], times[1:]):
        k1, hat = f(x, t0)
        x = hat if t1 >= 1 else x + 0.5 * (t1 - t0) * (k1 + f(x + (t1 - t0) * k1, t1)[0])
        xs.append(x)
    assert rel_err(traj, np.stack(xs)) <= SAMPLE_TOL
