"""Rank-error bound, merging and serialisation of QuantileSketch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.conformal import (
    ClientSummary,
    QuantileSketch,
    merge_summaries,
    pattern_from_key,
    summarize_client,
)


def max_rank_error(sketch: QuantileSketch, values: np.ndarray, weights: np.ndarray) -> float:
    """Compute sup_θ |F̃(θ) − F(θ)| by brute force at every breakpoint of either CDF."""
    thresholds = np.union1d(values, sketch.values)
    exact = np.array([weights[values <= theta].sum() for theta in thresholds])
    return float(np.max(np.abs(sketch.cdf(thresholds) - exact), initial=0.0))


client_data = st.lists(
    st.tuples(
        st.lists(st.integers(0, 50), min_size=1, max_size=60),  # scores on a grid, so ties occur
        st.floats(0.01, 5.0),                                  # the client's point weight
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(clients=client_data, compression=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_merged_rank_error_within_bound(clients, compression, seed):
    rng = np.random.default_rng(seed)
    sketches = [QuantileSketch.from_scores(np.array(scores, float) / 7.0, weight, compression)
                for scores, weight in clients]
    values = np.concatenate([np.array(scores, float) / 7.0 for scores, _ in clients])
    weights = np.concatenate([np.full(len(scores), weight) for scores, weight in clients])
    total = weights.sum()

    # Merge in a random binary tree of depth 2: pairs, then everything, then compress.
    order = rng.permutation(len(sketches))
    pairs = [QuantileSketch.merge([sketches[i] for i in order[start:start + 2]])
             for start in range(0, len(order), 2)]
    merged = QuantileSketch.merge(pairs).compress(compression)

    measured = max_rank_error(merged, values, weights)
    assert merged.size <= compression
    assert merged.total_weight == pytest.approx(total, rel=1e-12)
    assert measured <= merged.rank_error + 1e-9 * total
    # One compression at the client and one at the server, each below W/K.
    assert merged.rank_error <= 2 * total / compression * (1 + 1e-12)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-100, 100), min_size=1, max_size=200),
       weights_seed=st.integers(0, 2**16), compression=st.integers(1, 30))
def test_single_compression_error_below_w_over_k(values, weights_seed, compression):
    values = np.array(values)
    weights = np.random.default_rng(weights_seed).exponential(size=values.size) + 1e-3
    sketch = QuantileSketch(values, weights).compress(compression)
    assert max_rank_error(sketch, values, weights) <= sketch.rank_error + 1e-9 * weights.sum()
    assert sketch.rank_error < weights.sum() / compression * (1 + 1e-12)


def test_small_input_is_kept_exactly():
    sketch = QuantileSketch.from_scores([3.0, 1.0, 2.0], 0.5, compression=3)
    np.testing.assert_array_equal(sketch.values, [1.0, 2.0, 3.0])
    assert sketch.rank_error == 0.0


def test_equal_weights_give_equal_mass_buckets():
    # 12 points of weight 1 into K = 4: buckets {1,2,3}, {4,5,6}, ... with medians 2, 5, 8, 11.
    sketch = QuantileSketch.from_scores(np.arange(1.0, 13.0), 1.0, compression=4)
    np.testing.assert_array_equal(sketch.values, [2.0, 5.0, 8.0, 11.0])
    np.testing.assert_array_equal(sketch.weights, [3.0, 3.0, 3.0, 3.0])
    assert sketch.rank_error == 1.0


def test_merge_order_does_not_change_result():
    rng = np.random.default_rng(3)
    parts = [QuantileSketch.from_scores(rng.normal(size=40), rng.uniform(0.1, 1), 8) for _ in range(5)]
    forward = QuantileSketch.merge(parts).compress(8)
    backward = QuantileSketch.merge(parts[::-1]).compress(8)
    np.testing.assert_array_equal(forward.values, backward.values)
    np.testing.assert_array_equal(forward.weights, backward.weights)


def test_arrays_round_trip_and_byte_size():
    sketch = QuantileSketch.from_scores(np.linspace(0, 1, 100), 0.01, compression=10)
    values, weights = sketch.to_arrays(np.float32)
    assert values.dtype == np.float32
    assert sketch.nbytes(np.float32) == values.nbytes + weights.nbytes == 2 * 10 * 4
    copy = QuantileSketch.from_arrays(values, weights, sketch.rank_error)
    np.testing.assert_allclose(copy.values, sketch.values, rtol=1e-7)
    np.testing.assert_allclose(copy.weights, sketch.weights, rtol=1e-7)


def test_rejects_negative_weight():
    with pytest.raises(ValueError, match="positive"):
        QuantileSketch(np.array([1.0]), np.array([-1.0]))


def test_client_summary_keeps_atom_weight():
    rng = np.random.default_rng(0)
    memberships = rng.integers(0, 2, size=(300, 3))
    summary = summarize_client(rng.normal(size=300), memberships, 0.01, compression=5)
    for key, sketch in summary.sketches.items():
        pattern = pattern_from_key(key, 3)
        count = int(np.all(memberships == pattern, axis=1).sum())
        assert sketch.total_weight == pytest.approx(0.01 * count)
        assert sketch.size == min(count, 5)


def test_merge_rejects_mixed_group_counts():
    first = ClientSummary({}, num_groups=2, point_weight=0.1, num_points=0)
    second = ClientSummary({}, num_groups=3, point_weight=0.1, num_points=0)
    with pytest.raises(ValueError, match="number of groups"):
        merge_summaries([first, second], compression=4)
