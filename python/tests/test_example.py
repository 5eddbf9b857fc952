"""The PyTorch example (python/examples/fm_target_torch.py), skipped without torch."""

import importlib.util
import pathlib

import numpy as np
import pytest

from conftest import fashion_mnist

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "fm_target_torch.py"


def test_torch_example_learns_the_oracle_target():
    pytest.importorskip("torch")
    fashion_mnist(1)  # skips when the dataset is absent
    spec = importlib.util.spec_from_file_location("fm_target_torch", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    oracle_losses, conditional_losses = example.train(steps=60, batch=64, n_data=500, log_every=0)
    assert np.all(np.isfinite(oracle_losses))
    # The loss on the oracle target falls as the net learns it, and stays below the loss
    # on the noisy conditional target, which has the same minimiser plus its variance.
    assert np.mean(oracle_losses[-10:]) < 0.7 * np.mean(oracle_losses[:10])
    assert np.mean(oracle_losses[-10:]) < np.mean(conditional_losses[-10:])
