"""Tests of seed derivation: one root seed, one independent stream per purpose and keys."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsim.seeding import derive_seed, numpy_rng, torch_generator


def test_derive_seed_repeatable() -> None:
    assert derive_seed(7, "partition") == derive_seed(7, "partition")


def test_derive_seed_same_in_new_process() -> None:
    # Python salts str hashes per process, so the derived seed must not depend on hash().
    code = "from fedsim.seeding import derive_seed; print(derive_seed(7, 'client-shuffle', 3, 2))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        check=True,
        timeout=60,
    )

    assert int(result.stdout) == derive_seed(7, "client-shuffle", 3, 2)


def test_derive_seed_distinct_purposes() -> None:
    seeds = {derive_seed(0, purpose) for purpose in ("partition", "sample-train", "model-init", "client-shuffle")}

    assert len(seeds) == 4


def test_derive_seed_distinct_keys() -> None:
    # Rounds 1-3 for partitions 0-3: 12 streams.
    seeds = {derive_seed(0, "client-shuffle", round_, pid) for round_ in (1, 2, 3) for pid in range(4)}

    assert len(seeds) == 12


def test_derive_seed_key_order_matters() -> None:
    assert derive_seed(0, "client-shuffle", 1, 2) != derive_seed(0, "client-shuffle", 2, 1)


def test_derive_seed_distinct_roots() -> None:
    assert derive_seed(0, "partition") != derive_seed(1, "partition")


def test_derive_seed_fits_63_bits() -> None:
    for root in range(20):
        seed = derive_seed(root, "partition")
        assert 0 <= seed < 2**63


def test_derive_seed_rejects_negative_key() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, "client-shuffle", 1, -1)


def test_derive_seed_rejects_negative_root() -> None:
    with pytest.raises(ValueError):
        derive_seed(-1, "partition")


def test_numpy_rng_repeatable() -> None:
    first = numpy_rng(3, "sample-train", 1).integers(0, 1000, size=8)
    second = numpy_rng(3, "sample-train", 1).integers(0, 1000, size=8)

    np.testing.assert_array_equal(first, second)


def test_numpy_rng_per_round() -> None:
    first = numpy_rng(3, "sample-train", 1).integers(0, 2**32, size=8)
    second = numpy_rng(3, "sample-train", 2).integers(0, 2**32, size=8)

    assert not np.array_equal(first, second)


def test_torch_generator_repeatable() -> None:
    first = torch.randperm(50, generator=torch_generator(3, "client-shuffle", 1, 0))
    second = torch.randperm(50, generator=torch_generator(3, "client-shuffle", 1, 0))

    assert torch.equal(first, second)


def test_torch_generator_keeps_global_rng() -> None:
    before = torch.get_rng_state()

    torch.rand(3, generator=torch_generator(3, "client-shuffle", 1, 0))

    assert torch.equal(torch.get_rng_state(), before)
