"""Same bytes and same error messages as the `oracleflow` command line; input checks.

The CLI is found as $ORACLEFLOW_BIN or target/release/oracleflow (these tests skip with a
message when it is absent). Both sides use backend "cpu", so they run the same kernels.
"""

import subprocess
import threading
import time

import numpy as np
import pytest

import oracleflow


def run_cli(*args, ok=True):
    from conftest import cli_binary

    proc = subprocess.run([cli_binary(), *map(str, args)], capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def embedded():
    return oracleflow.Oracle("embedded", backend="cpu")


def test_velocity_same_bytes_as_cli(embedded, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    ts = rng.uniform(0, 0.99, 40).astype(np.float32)
    np.save(tmp_path / "q.npy", x)
    np.save(tmp_path / "t.npy", ts)
    for args, kwargs in [
        (["--t", "0.3"], dict(t=0.3)),
        (["--times", tmp_path / "t.npy"], dict(t=ts)),
        (["--t", "0.7", "--class", "4"], dict(t=0.7, cls=4)),
    ]:
        run_cli("velocity", "--data", "embedded", "--backend", "cpu", "--queries", tmp_path / "q.npy",
                "--out", tmp_path / "v.npy", "--x1-hat", tmp_path / "h.npy", "--force", *args)
        u = embedded.velocity(x, **kwargs)
        x1_hat, _ = embedded.denoise(x, **kwargs)
        assert u.tobytes() == np.load(tmp_path / "v.npy").tobytes(), args
        assert x1_hat.tobytes() == np.load(tmp_path / "h.npy").tobytes(), args


def test_large_batch_and_npy_data_same_bytes_as_cli(tmp_path):
    """More queries than one engine call takes (1024): cut the same way as the CLI."""
    rng = np.random.default_rng(1)
    data = rng.standard_normal((300, 2, 5)).astype(np.float32)
    x = rng.standard_normal((1100, 2, 5)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    np.save(tmp_path / "q.npy", x)
    run_cli("velocity", "--data", f"npy:{tmp_path / 'data.npy'}", "--backend", "cpu",
            "--queries", tmp_path / "q.npy", "--t", "0.8", "--out", tmp_path / "v.npy")
    from_spec = oracleflow.Oracle(f"npy:{tmp_path / 'data.npy'}", backend="cpu")
    from_array = oracleflow.Oracle(data, backend="cpu")
    want = np.load(tmp_path / "v.npy").tobytes()
    assert from_spec.velocity(x, 0.8).tobytes() == want
    assert from_array.velocity(x, 0.8).tobytes() == want


@pytest.mark.parametrize(
    "cli,kwargs",
    [
        ([], {}),
        (["--solver", "rk4", "--shift", "0.5", "--steps", "6"], dict(solver="rk4", shift=0.5, steps=6)),
        (["--classes", "all", "--cfg-scale", "2", "--cfg-interval", "0.1,0.7"],
         dict(classes="all", cfg_scale=2.0, cfg_interval=(0.1, 0.7))),
        (["--class", "3", "--solver", "euler"], dict(classes=3, solver="euler")),
    ],
)
def test_sample_same_bytes_as_cli(embedded, tmp_path, cli, kwargs):
    kwargs = {"steps": 8, **kwargs}
    if "--steps" not in cli:
        cli = cli + ["--steps", "8"]
    run_cli("sample", "--data", "embedded", "--backend", "cpu", "-n", 12, "--seed", 5,
            "--out", tmp_path, "--force", *cli)
    ours = oracleflow.sample(embedded, 12, seed=5, **kwargs)
    assert ours.tobytes() == np.load(tmp_path / "samples.npy").tobytes()


@pytest.mark.parametrize(
    "make,cli_args,exc",
    [
        (lambda: oracleflow.Oracle("missing-file.npy"), ["--data", "missing-file.npy"], FileNotFoundError),
        (lambda: oracleflow.Oracle("fashion-mnist@0"), ["--data", "fashion-mnist@0"], ValueError),
        (lambda: oracleflow.Oracle("gaussian:10"), ["--data", "gaussian:10"], ValueError),
        (lambda: oracleflow.Oracle("embedded").velocity(np.zeros((2, 784), np.float32), 0.5, cls=12),
         ["--class", "12"], ValueError),
    ],
)
def test_errors_say_what_the_cli_says(tmp_path, make, cli_args, exc):
    np.save(tmp_path / "q.npy", np.zeros((2, 784), np.float32))
    args = ["velocity", "--data", "embedded", "--backend", "cpu", "--queries", tmp_path / "q.npy",
            "--t", "0.5", "--out", tmp_path / "v.npy"]
    for i in range(0, len(cli_args), 2):
        if cli_args[i] in args:
            args[args.index(cli_args[i]) + 1] = cli_args[i + 1]
        else:
            args += cli_args[i : i + 2]
    proc = run_cli(*args, ok=False)
    assert proc.returncode != 0
    with pytest.raises(exc) as info:
        make()
    # The CLI prints anyhow's "{e:#}", which repeats an I/O error's source after the
    # library's message ("x.npy: No such file ... (os error 2): No such file ..."):
    # the library's message comes first, and that is what Python raises.
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {info.value}")


def test_bad_input(embedded):
    x = np.zeros((3, 1, 28, 28), np.float32)
    data = np.zeros((10, 4), np.float32)
    big = np.zeros((101, 2), np.float32)
    big[100, 0] = 1e5  # beyond f16's range once centred
    cases = [
        (lambda: oracleflow.Oracle(np.zeros((10, 4), np.float64)), ValueError, "float64 is not supported"),
        (lambda: oracleflow.Oracle(np.zeros(10, np.float32)), ValueError, "(N, ...)"),
        (lambda: oracleflow.Oracle(np.zeros((0, 4), np.float32)), ValueError, "do not form samples"),
        (lambda: oracleflow.Oracle(np.full((2, 2), np.nan, np.float32)), ValueError, "non-finite"),
        (lambda: oracleflow.Oracle(data, labels=np.zeros(9, int)), ValueError, "one label for each"),
        (lambda: oracleflow.Oracle(data, labels=np.full(10, -1)), ValueError, "label -1"),
        (lambda: oracleflow.Oracle(data, labels=np.zeros(10)), ValueError, "not an integer type"),
        (lambda: oracleflow.Oracle("embedded", labels=np.zeros(2000, int)), ValueError, "only for array data"),
        (lambda: oracleflow.Oracle(data, backend="tpu"), ValueError, "auto, gpu, cpu, reference"),
        (lambda: oracleflow.Oracle(data, path="ddpm"), ValueError, "rf, vp-cosine"),
        (lambda: oracleflow.Oracle(data, dtype="f64"), ValueError, "f32, f16"),
        (lambda: oracleflow.Oracle(data, memory_budget_mib=0), ValueError, "memory_budget_mib=0"),
        (lambda: oracleflow.Oracle(big, dtype="f16"), ValueError, "sample 100 does not fit F16"),
        (lambda: oracleflow.Oracle(object()), ValueError, "dtype object is not supported"),
        (lambda: embedded.velocity(x, 1.5), ValueError, "time 1.5 is outside [0, 1]"),
        (lambda: embedded.velocity(x, [0.5, 0.5]), ValueError, "one time for each of the 3"),
        (lambda: embedded.velocity(x[:, :, :14], 0.5), ValueError, "784 values per query"),
        (lambda: embedded.velocity(x.astype(np.int32), 0.5), ValueError, "not a float type"),
        (lambda: embedded.velocity(np.full_like(x, np.inf), 0.5), ValueError, "non-finite"),
        (lambda: embedded.velocity(x, 0.5, cls=[1, 2]), ValueError, "integer array (3,)"),
        (lambda: embedded.velocity(x, 0.5, cls=-2), ValueError, "cls=-2"),
        (lambda: embedded.denoise(x, 0.5, cls=99), ValueError, "no sample of that class"),
        (lambda: embedded.nearest(x, k=0), ValueError, "k=0"),
        (lambda: embedded.nearest(x, k=2001), ValueError, "k=2001"),
        (lambda: oracleflow.sample(embedded, 0), ValueError, "n=0"),
        (lambda: oracleflow.sample(embedded, 2, steps=0), ValueError, "--steps must be at least 1"),
        (lambda: oracleflow.sample(embedded, 2, shift=-1.0), ValueError, "--shift -1 must be > 0"),
        (lambda: oracleflow.sample(embedded, 2, solver="midpoint"), ValueError, "euler, heun, rk4"),
        (lambda: oracleflow.sample(embedded, 2, classes="some"), ValueError, 'expected "all"'),
        (lambda: oracleflow.sample(embedded, 2, classes=[1]), ValueError, "1 classes for n = 2"),
        (lambda: oracleflow.sample(embedded, 2, classes=10), ValueError, "no sample of that class"),
        (lambda: oracleflow.sample(embedded, 2, cfg_scale=2.0), ValueError, "cfg_scale needs classes"),
        (lambda: oracleflow.sample(embedded, 2, classes=1, cfg_scale=2.0, cfg_interval=(0.8, 0.2)),
         ValueError, "t_lo <= t_hi"),
        (lambda: oracleflow.sample(embedded, 2, cfg_interval=(0.0, 0.5)), ValueError, "needs cfg_scale"),
        (lambda: oracleflow.sample(oracleflow.Oracle(data), 2, classes="all"), ValueError, "has no labels"),
    ]
    for make, exc, text in cases:
        with pytest.raises(exc) as info:
            make()
        assert text is None or text in str(info.value), (text, str(info.value))
        assert "\n" not in str(info.value)


def test_gil_released_during_engine_calls(embedded):
    """While one thread is inside velocity, another Python thread keeps running."""
    x = np.random.default_rng(0).standard_normal((1024, 784)).astype(np.float32)
    start = time.perf_counter()
    embedded.velocity(x, 0.5)
    alone = time.perf_counter() - start

    ticks = []
    done = threading.Event()

    def work():
        for _ in range(4):
            embedded.velocity(x, 0.5)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    # With the GIL held the loop would stall for each whole call (gaps ~ alone); released,
    # it ticks every millisecond or so throughout the four calls.
    gaps = np.diff(ticks)
    assert len(ticks) >= 3 and gaps.max() < 0.5 * max(alone, 0.05), (alone, gaps.max(), len(ticks))
