"""Flow matching in PyTorch with the exact oracle velocity as the training target.

The usual conditional target (x1 - x0 for rectified flow) is a noisy, single-sample
estimate of the marginal velocity u(x_t, t) = E[x1 - x0 | x_t]; oracleflow computes that
expectation exactly over the whole training set. Regressing on it has the same
minimiser without the conditional target's variance, which is largest where the posterior
over training samples is broad (small t, large datasets; on 2000 images it is one-hot for
most t, so the gap is modest). This trains a small MLP on the first 2000 Fashion-MNIST
images with the oracle target and prints its loss beside the loss of the same
predictions against the conditional target.

    python python/examples/fm_target_torch.py --steps 300

Needs torch and the dataset-fashion-mnist package (IDX files in
/usr/share/datasets/fashion-mnist); exits 0 with a message when torch is absent.
"""

import argparse
import gzip
import json
import pathlib
import sys

import numpy as np

try:
    import torch
except ImportError:
    print("skipped: this example needs torch (pip install torch)")
    sys.exit(0)

import oracleflow

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def load_images(n):
    """The first n Fashion-MNIST training images as uint8 (n, 1, 28, 28)."""
    with gzip.open(FASHION_MNIST / "train-images-idx3-ubyte.gz", "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]


def velocity_net(dim, hidden=512):
    return torch.nn.Sequential(
        torch.nn.Linear(dim + 1, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, dim),
    )


def train(steps=300, batch=128, n_data=2000, seed=0, log_every=50):
    """Trains one net on the oracle target; returns its losses and, for comparison, the
    loss of the same net on the usual conditional target at each step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = load_images(n_data)
    data = torch.from_numpy(images.reshape(n_data, -1).astype(np.float32) / 127.5 - 1.0)
    dim = data.shape[1]
    net = velocity_net(dim)
    # The optimizer before the oracle: torch.optim imports triton, whose bundled LLVM
    # crashes when loaded after Mesa's Vulkan drivers (which the oracle opens to look
    # for a GPU); loaded before them, both work.
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # uint8 pixels: the oracle maps them to [-1, 1] as p / 127.5 - 1, as `data` above.
    oracle = oracleflow.Oracle(images)
    oracle_losses, conditional_losses = [], []
    for step in range(steps):
        x1 = data[torch.from_numpy(rng.integers(0, n_data, batch))]
        x0 = torch.randn_like(x1)
        t = torch.rand(batch) * 0.98  # the target divides by sigma = 1 - t
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        # The exact marginal velocity at (x_t, t): numpy in, numpy out, no copy of x_t.
        target = torch.from_numpy(oracle.velocity(xt.numpy(), t.numpy()))
        pred = net(torch.cat([xt, t[:, None]], dim=1))
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        oracle_losses.append(loss.item())
        with torch.no_grad():
            conditional_losses.append(((pred - (x1 - x0)) ** 2).mean().item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:4d}  loss vs oracle target {oracle_losses[-1]:.4f}  "
                f"vs conditional target {conditional_losses[-1]:.4f}"
            )
    return oracle_losses, conditional_losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-data", type=int, default=2000, help="training images used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write both loss curves to this file")
    args = parser.parse_args()
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        print(f"skipped: {FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
        return
    oracle_losses, conditional_losses = train(args.steps, args.batch, args.n_data, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"oracle": oracle_losses, "conditional": conditional_losses}, f)


if __name__ == "__main__":
    main()
