"""Correlation quality, balance factor, aggregation weights and weighted averaging (METHOD.md section 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    aggregation_weights_ref,
    balance_factor_ref,
    correlation_discrepancy_ref,
    quality_from_discrepancy_ref,
    weighted_average_ref,
)

from lightning_fedharmony.functional import (
    aggregation_weights,
    balance_factor,
    block_mask,
    correlation_discrepancy,
    correlation_quality,
    quality_from_discrepancy,
    weighted_average,
)
from lightning_fedharmony.functional.aggregation import QualityWeighting

MODES: list[QualityWeighting] = ["additive", "product"]


def _corr(num_clients: int, num_labels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(num_clients, num_labels, num_labels, generator=generator, dtype=torch.float64) - 1


@pytest.mark.parametrize("per_client_mask", [False, True])
def test_correlation_discrepancy_matches_reference(per_client_mask: bool) -> None:
    corr, teacher = _corr(4, 5, seed=1), _corr(4, 5, seed=2)
    if per_client_mask:
        mask = torch.rand(4, 5, 5, generator=torch.Generator().manual_seed(3)) < 0.4
        mask[2] = False  # a client with no pair to score
    else:
        mask = block_mask(torch.tensor([0, 0, 1, 1, 1]))
    got = correlation_discrepancy(corr, teacher, mask)
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), correlation_discrepancy_ref(corr.numpy(), teacher.numpy(), mask.numpy()))
    if per_client_mask:
        assert got[2].item() == 0.0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 7.0, 3])
def test_correlation_quality_fixed_gamma(gamma: float) -> None:
    corr, teacher = _corr(5, 4, seed=4), _corr(5, 4, seed=5)
    mask = ~torch.eye(4, dtype=torch.bool)
    got = correlation_quality(corr, teacher, mask, gamma=gamma)
    s = correlation_discrepancy_ref(corr.numpy(), teacher.numpy(), mask.numpy())
    np.testing.assert_allclose(got.numpy(), quality_from_discrepancy_ref(s, gamma), rtol=1e-12)
    assert bool(((got > 0) & (got <= 1)).all())


@pytest.mark.parametrize("num_clients", [1, 3, 5])
def test_correlation_quality_auto_gamma_odd_count(num_clients: int) -> None:
    corr, teacher = _corr(num_clients, 4, seed=6), _corr(num_clients, 4, seed=7)
    mask = ~torch.eye(4, dtype=torch.bool)
    got = correlation_quality(corr, teacher, mask)
    s = correlation_discrepancy_ref(corr.numpy(), teacher.numpy(), mask.numpy())
    np.testing.assert_allclose(got.numpy(), np.exp(-s / np.median(s)), rtol=1e-12)
    # the client at the median has quality exp(-1)
    assert np.exp(-1.0) == pytest.approx(float(np.median(got.numpy())), rel=1e-12)


@pytest.mark.parametrize(
    "discrepancy",
    [[0.1, 0.3], [0.05, 0.2, 0.4, 0.9], [0.0, 0.2], [0.0, 0.0, 0.3, 0.5]],
)
def test_quality_auto_gamma_even_count_uses_the_median(discrepancy: list[float]) -> None:
    """``gamma = 1 / median_k s_k``: with an even number of clients the median is the mean of the middle two."""
    s = torch.tensor(discrepancy, dtype=torch.float64)
    np.testing.assert_allclose(quality_from_discrepancy(s).numpy(), quality_from_discrepancy_ref(s.numpy()), rtol=1e-12)


def test_quality_auto_gamma_zero_median_gives_ones() -> None:
    for s in ([0.0, 0.0, 0.4], [0.0], [0.0, 0.0, 0.0, 0.0]):
        torch.testing.assert_close(quality_from_discrepancy(torch.tensor(s)), torch.ones(len(s)))
    corr = _corr(3, 3, seed=8)
    torch.testing.assert_close(
        correlation_quality(corr, corr.clone(), torch.ones(3, 3, dtype=torch.bool)), torch.ones(3, dtype=torch.float64)
    )
    assert quality_from_discrepancy(torch.zeros(0)).shape == (0,)


def test_quality_invalid() -> None:
    with pytest.raises(ValueError, match=r"`gamma` to be 'auto' or a non-negative float, but got -1.0"):
        quality_from_discrepancy(torch.tensor([0.1]), gamma=-1.0)
    with pytest.raises(ValueError, match=r"`gamma` to be 'auto' or a non-negative float, but got 'median'"):
        quality_from_discrepancy(torch.tensor([0.1]), gamma="median")
    with pytest.raises(ValueError, match=r"`gamma` to be 'auto' or a non-negative float, but got True"):
        quality_from_discrepancy(torch.tensor([0.1]), gamma=True)
    with pytest.raises(ValueError, match=r"Expected argument `discrepancy` to have shape \(K,\), but got \(2, 2\)"):
        quality_from_discrepancy(torch.zeros(2, 2))
    corr = _corr(2, 3, seed=9)
    with pytest.raises(ValueError, match=r"`corr` and `teacher` to share one \(K, L, L\) shape, but got \(2, 3, 3\)"):
        correlation_discrepancy(corr, corr[:1], torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"but got \(3, 3\) and \(3, 3\)"):
        correlation_quality(corr[0], corr[0], torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("server_round", "t0"), [(1, 10), (5, 10), (10, 10), (12, 10), (1, 1), (3, 0), (2, -1), (7, 2.5)]
)
def test_balance_factor_matches_reference(server_round: int, t0: float) -> None:
    assert balance_factor(server_round, t0) == pytest.approx(balance_factor_ref(server_round, t0), abs=1e-15)
    assert 0.0 <= balance_factor(server_round, t0) < 1.0


def test_balance_factor_invalid() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `server_round` to be an int >= 1, but got 0"):
        balance_factor(0, 10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("server_round", [1, 3, 6, 20])
def test_aggregation_weights_match_reference(mode: QualityWeighting, server_round: int) -> None:
    n = torch.tensor([120.0, 30.0, 7.0, 400.0])
    q = torch.tensor([0.9, 0.2, 1.0, 0.5])
    got = aggregation_weights(n, q, server_round=server_round, t0=6, mode=mode)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), aggregation_weights_ref(n.numpy(), q.numpy(), server_round, 6, mode))
    assert got.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_aggregation_weights_schedule_endpoints() -> None:
    n = torch.tensor([3.0, 1.0])
    q = torch.tensor([0.2, 0.6])
    # after T0 only quality counts; with T0 <= 0 quality counts from the start
    torch.testing.assert_close(aggregation_weights(n, q, 8, t0=4), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(aggregation_weights(n, q, 1, t0=0), torch.tensor([0.25, 0.75], dtype=torch.float64))
    # product form: n_k q_k / sum n q, independent of the round
    expected = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for server_round in (1, 100):
        torch.testing.assert_close(aggregation_weights(n, q, server_round, t0=4, mode="product"), expected)


def test_aggregation_weights_all_zero_is_uniform() -> None:
    zeros = torch.zeros(4)
    for mode in MODES:
        got = aggregation_weights(zeros, zeros, 2, t0=5, mode=mode)
        torch.testing.assert_close(got, torch.full((4,), 0.25, dtype=torch.float64))


def test_aggregation_weights_invalid() -> None:
    n = torch.ones(3)
    with pytest.raises(
        ValueError, match=r"Expected argument `mode` to be one of \('additive', 'product'\), but got 'x'"
    ):
        aggregation_weights(n, n, 1, 2, mode="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`num_samples` and `quality` to share one \(K,\) shape, but got \(3,\) and"):
        aggregation_weights(n, torch.ones(2), 1, 2)
    with pytest.raises(ValueError, match=r"share one \(K,\) shape, but got \(1, 3\) and \(1, 3\)"):
        aggregation_weights(n[None], n[None], 1, 2)
    with pytest.raises(ValueError, match="`server_round` to be an int >= 1"):
        aggregation_weights(n, n, 0, 2)


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(
    n=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    server_round=st.integers(1, 30),
    t0=st.floats(-2.0, 40.0, allow_nan=False),
    mode=st.sampled_from(MODES),
)
def test_property_aggregation_weights(
    n: list[int], seed: int, server_round: int, t0: float, mode: QualityWeighting
) -> None:
    num_samples = torch.tensor(n, dtype=torch.float64)
    quality = torch.rand(len(n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = aggregation_weights(num_samples, quality, server_round, t0, mode=mode)
    assert torch.isfinite(got).all() and bool((got >= 0).all())
    assert got.sum().item() == pytest.approx(1.0, abs=1e-12)
    expected = aggregation_weights_ref(num_samples.numpy(), quality.numpy(), server_round, t0, mode)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def _state_dicts(num_clients: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "layer.weight": torch.randn(3, 4, generator=generator),
            "layer.bias": torch.randn(3, generator=generator, dtype=torch.float64),
            "half": torch.randn(2, generator=generator).half(),
            "scalar": torch.randn((), generator=generator),
            "bn.num_batches_tracked": torch.tensor(10 * (k + 1)),
            "flags": torch.tensor([k % 2 == 0, True]),
        }
        for k in range(num_clients)
    ]


@pytest.mark.parametrize("weights", [[3.0, 1.0, 6.0], [1.0, 1.0, 1.0], [0.0, 5.0, 0.0], [0.2, 0.5, 0.3]])
def test_weighted_average_matches_numpy(weights: list[float]) -> None:
    states = _state_dicts(3, seed=1)
    got = weighted_average(states, weights)
    assert list(got) == list(states[0])
    expected = weighted_average_ref([{k: v.numpy() for k, v in s.items()} for s in states], weights)
    top = int(np.argmax(weights))
    for key, value in got.items():
        assert value.dtype == states[0][key].dtype
        assert value.shape == states[0][key].shape
        if value.is_floating_point():
            rtol = 1e-3 if value.dtype == torch.float16 else 1e-6
            np.testing.assert_allclose(value.double().numpy(), expected[key], rtol=rtol, atol=1e-6)
        else:
            # integer and boolean buffers come from the heaviest client
            assert torch.equal(value, states[top][key])


def test_weighted_average_tensor_weights_and_float64() -> None:
    states = [
        {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)},
        {"w": torch.tensor([3.0, 6.0], dtype=torch.float64)},
    ]
    got = weighted_average(states, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(got["w"], torch.tensor([2.5, 5.0], dtype=torch.float64))
    np.testing.assert_allclose(got["w"].numpy(), np.average([[1.0, 2.0], [3.0, 6.0]], axis=0, weights=[1.0, 3.0]))


def test_weighted_average_single_client_and_copies() -> None:
    states = _state_dicts(1, seed=2)
    got = weighted_average(states, [4.0])
    for key, value in got.items():
        torch.testing.assert_close(value, states[0][key])
    got["bn.num_batches_tracked"] += 1
    assert states[0]["bn.num_batches_tracked"].item() == 10  # the result does not alias the input


def test_weighted_average_all_zero_weights_is_plain_mean() -> None:
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}]
    torch.testing.assert_close(weighted_average(states, [0.0, 0.0])["w"], torch.tensor([2.0]))


def test_weighted_average_detaches() -> None:
    w = torch.ones(2, requires_grad=True)
    got = weighted_average([{"w": w}, {"w": 3 * w}], [1.0, 1.0])
    assert not got["w"].requires_grad
    torch.testing.assert_close(got["w"], torch.full((2,), 2.0))


def test_weighted_average_key_order_does_not_matter() -> None:
    """The same keys in another order (e.g. a state dict read back from a sorted on-disk format) are matched by key."""
    states = _state_dicts(2, seed=3)
    reordered = dict(sorted(states[1].items()))
    assert list(reordered) != list(states[1]) and set(reordered) == set(states[1])
    got = weighted_average([states[0], reordered], [1.0, 3.0])
    torch.testing.assert_close(got, weighted_average(states, [1.0, 3.0]))


def test_weighted_average_invalid() -> None:
    states = _state_dicts(2, seed=4)
    with pytest.raises(
        ValueError, match="Expected argument `state_dicts` to hold at least one state dict, but got none"
    ):
        weighted_average([], [])
    with pytest.raises(ValueError, match=r"`weights` to hold 2 finite non-negative values, but got \[1.0\]"):
        weighted_average(states, [1.0])
    with pytest.raises(ValueError, match=r"`weights` to hold 2 finite non-negative values, but got \[1.0, -2.0\]"):
        weighted_average(states, [1.0, -2.0])
    with pytest.raises(ValueError, match=r"`weights` to hold 2 finite non-negative values, but got \[1.0, nan\]"):
        weighted_average(states, [1.0, float("nan")])
    missing = dict(states[1])
    del missing["layer.bias"]
    with pytest.raises(ValueError, match="Expected every state dict to have the keys of the first, but state dict 1"):
        weighted_average([states[0], missing], [1.0, 1.0])
    extra = {**states[1], "new": torch.zeros(1)}
    with pytest.raises(ValueError, match="keys of the first, but state dict 1 differs"):
        weighted_average([states[0], extra], [1.0, 1.0])
    wrong_shape = {**states[1], "layer.weight": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match=r"Expected entry 'layer\.weight' to have one shape in every state dict"):
        weighted_average([states[0], wrong_shape], [1.0, 1.0])
