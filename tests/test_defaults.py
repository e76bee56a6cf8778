"""FedHarmony's validated defaults, the paper preset, noise-aware quality weights, auto blocks, the client report."""

from __future__ import annotations

import pytest
import torch
from helpers.pinned import pinned_federation, weights_digest
from torch import Tensor

from lightning_fedharmony import CorrelationStats, FedAvg, FedHarmony, FedProx
from lightning_fedharmony.aggregators import ClientUpdate
from lightning_fedharmony.aggregators.fedharmony import PAPER_SETTINGS
from lightning_fedharmony.functional import (
    auto_block_range,
    correlation_discrepancy,
    sampling_discrepancy,
    spectral_label_blocks,
)
from lightning_fedharmony.functional.blocks import BLOCK_KERNEL_MIN_LABELS

# Digests of the pinned federation's final weights, taken before the defaults changed (paper = the old defaults).
# A change that moves them changes numbers users see: it must be deliberate.
PINNED = {
    "fedharmony_paper": "93f91b11d3913002b00e1150903e23fdee469e5b0befc38ab21c5e30430392d8",
    "fedavg": "6d874411b23823aa212d09909c97c985fc6c07f6e7701941616178f1c3b2b449",
    "fedprox": "d0fa7bac4c3d18c8131e81e728cab820cd569da19c4524f4cb138d39846d7885",
}
# The validated default's, one and three local epochs, taken when each rule was adopted (the pinned federation has 5
# labels, so the label-count factor on `mu` acts): the default; the label-aware proximal term without that factor (the
# default before it); FedProx's uniform term (the default before that: alignment with running moments, the drift rule).
PINNED_DEFAULT = {
    ("default", 1): "6a1429d3ff3f7fd1dc0d570c8fb0a8f2fa4bcb5c2bcf26b88207b52174913cf6",
    ("default", 3): "dd61a9f8a74f00362d39b1f3becfc1cfc8fe50f2345f836d2d3556cd78e3f45b",
    ("labels", 1): "1268cb4fc79be2b988dc62320c1e99cfe2953f72a72dc7c216f7e9d2998ca5b5",
    ("labels", 3): "e7ca3151d065f5cb7e563de9bfdd555847109c6765a823ff1d69177e1fa6af6d",
    ("uniform", 1): "5cd3f6961fc8067c2f0909532a1cc319c81ae013ddd8b525bbd62b2ce961e86c",
    ("uniform", 3): "486272aad54abaf4abfccf4fa463415a8b3583963a82b0a8282093dc8638c0dc",
}
DEFAULTS_BY_RELEASE = {
    "default": {},
    "labels": {"proximal_reference_labels": 0.0},
    "uniform": {"proximal_rows": "uniform", "proximal_reference_labels": 0.0},
}


@pytest.mark.parametrize(
    ("name", "aggregator"),
    [("fedharmony_paper", FedHarmony.paper()), ("fedavg", FedAvg()), ("fedprox", FedProx(proximal_mu=0.01))],
)
def test_pinned_final_weights(name: str, aggregator) -> None:
    federation = pinned_federation(aggregator)
    federation.fit()
    assert weights_digest(federation.global_weights) == PINNED[name]


@pytest.mark.parametrize("local_epochs", [1, 3])
@pytest.mark.parametrize("name", list(DEFAULTS_BY_RELEASE))
def test_pinned_final_weights_of_the_default(name: str, local_epochs: int) -> None:
    federation = pinned_federation(FedHarmony(**DEFAULTS_BY_RELEASE[name]), local_epochs=local_epochs)
    federation.fit()
    assert federation.model.fedharmony_has_teacher  # round two's teachers were installed
    assert weights_digest(federation.global_weights) == PINNED_DEFAULT[name, local_epochs]


def test_paper_preset_settings_and_overrides() -> None:
    paper = FedHarmony.paper()
    for key, value in PAPER_SETTINGS.items():
        assert getattr(paper, key) == value, key
    assert FedHarmony.paper(alignment_weight=10.0, t0=3).alignment_weight == 10.0
    with pytest.raises(ValueError, match=r"`num_blocks` to be 'auto', 'eigengap' or an int >= 1, but got 0"):
        FedHarmony.paper(num_blocks=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"discrepancy_baseline": "noise"}, ValueError, r"`discrepancy_baseline` to be one of \('sampling', 'none'\)"),
        ({"corr_momentum": 1.0}, ValueError, r"`corr_momentum` to be None or in \[0, 1\), but got 1\.0"),
        ({"detach_marginals": "yes"}, TypeError, r"`detach_marginals` to be None or a bool, but got 'yes'"),
    ],
)
def test_new_constructor_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        FedHarmony(**kwargs)


def test_default_instructions_carry_every_client_setting() -> None:
    federation = pinned_federation(FedHarmony(), num_rounds=2)
    federation.fit()
    model = federation.model
    # round 2's instructions were installed: the module follows the server, not its constructor
    assert model.fedharmony_has_teacher
    assert model.fedharmony_corr_normalization == "pearson"
    assert model.fedharmony_detach_marginals is True and model.fedharmony_corr_momentum == 0.9
    assert model.fedharmony_alignment_weight == 0.03 and model.fedharmony_proximal_mu == 0.01
    assert model.fedharmony_proximal_scaling == "drift"
    paper = pinned_federation(FedHarmony.paper(), num_rounds=2, detach_marginals=True, corr_momentum=0.5)
    paper.model.fedharmony_configure(proximal_scaling="drift")
    paper.fit()
    assert paper.model.fedharmony_detach_marginals is False and paper.model.fedharmony_corr_momentum == 0.0
    assert paper.model.fedharmony_proximal_scaling == "none"


# ---------------------------------------------------------------------------------------------------- quality weights
def test_sampling_discrepancy_against_a_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    corr = torch.rand(3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    teacher = torch.rand(3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    mask = torch.rand(3, 4, 4, generator=generator) < 0.6
    n = torch.tensor([10.0, 50.0, 200.0], dtype=torch.float64)
    m = torch.tensor([500.0, 0.0, 30.0], dtype=torch.float64)
    result = sampling_discrepancy(corr, teacher, mask, n, m)
    for k in range(3):
        terms = [
            (1 - corr[k, i, j] ** 2) ** 2 / n[k] + ((1 - teacher[k, i, j] ** 2) ** 2 / m[k] if m[k] > 0 else 0.0)
            for i in range(4)
            for j in range(4)
            if mask[k, i, j]
        ]
        assert float(result[k]) == pytest.approx(float(sum(terms) / max(len(terms), 1)), rel=1e-12)
    with pytest.raises(ValueError, match=r"Expected argument `teacher_samples` to have shape \(3,\), but got \(2,\)"):
        sampling_discrepancy(corr, teacher, mask, n, m[:2])


NUM_LABELS = 8


def _client(cid: str, num_samples: int, seed: int, flip: bool = False) -> ClientUpdate:
    """Predictions from one shared concept (two correlated label groups); ``flip`` reverses the groups' signs."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, num_samples, 1, generator=generator, dtype=torch.float64)
    logits = 0.8 * torch.randn(num_samples, NUM_LABELS, generator=generator, dtype=torch.float64)
    sign = -1.0 if flip else 1.0
    logits[:, :4] += 1.5 * first * torch.tensor([1.0, sign, 1.0, sign], dtype=torch.float64)
    logits[:, 4:] += 1.5 * second * torch.tensor([1.0, sign, 1.0, sign], dtype=torch.float64)
    preds = torch.sigmoid(logits)
    stats = CorrelationStats(NUM_LABELS)
    stats.update(preds, (preds > 0.5).double())
    weights = {"w": torch.full((2,), float(seed))}
    return ClientUpdate(cid, weights, num_samples, stats)


def _weights_at_round(aggregator: FedHarmony, updates: list[ClientUpdate], rounds: int = 4) -> dict[str, float]:
    aggregator.setup(rounds)
    result = None
    for server_round in range(1, rounds + 1):
        result = aggregator.aggregate_round(server_round, updates)
    assert result is not None
    return result.client_weights


def _share(updates: list[ClientUpdate]) -> dict[str, float]:
    total = sum(u.num_samples for u in updates)
    return {u.client_id: u.num_samples / total for u in updates}


def test_a_small_honest_client_keeps_its_weight() -> None:
    updates = [_client(f"big{k}", 400, seed=k) for k in range(4)] + [_client("small", 25, seed=9)]
    share = _share(updates)["small"]
    noise_aware = _weights_at_round(FedHarmony(quality_aggregation=True), updates)["small"]
    paper = _weights_at_round(FedHarmony.paper(), updates)["small"]
    assert 0.85 * share <= noise_aware <= 1.05 * share
    # the paper's rule weighs q_k alone once alpha_t reaches 0, with gamma = 1 / median s_k on the raw discrepancy:
    # the small client's weight then follows its sampling noise, not its size (here 5x its share)
    assert abs(paper - share) > 0.5 * share


def test_one_large_honest_client_among_many_small_ones_keeps_its_weight() -> None:
    updates = [_client("large", 2000, seed=0)] + [_client(f"s{k}", 50, seed=1 + k) for k in range(9)]
    shares = _share(updates)
    weights = _weights_at_round(FedHarmony(quality_aggregation=True), updates)
    assert weights["large"] == pytest.approx(shares["large"], rel=0.05)
    assert _weights_at_round(FedHarmony.paper(), updates)["large"] < 0.5 * shares["large"]


def test_a_client_that_really_disagrees_loses_its_weight() -> None:
    updates = [_client(f"c{k}", 300, seed=k) for k in range(5)] + [_client("odd", 300, seed=7, flip=True)]
    aggregator = FedHarmony(quality_aggregation=True)
    weights = _weights_at_round(aggregator, updates)
    share = _share(updates)["odd"]
    assert weights["odd"] < 0.3 * share
    assert all(weights[f"c{k}"] > share for k in range(5))
    report, pairs = aggregator.client_report()
    assert report["odd"]["discrepancy"] > 10 * report["odd"]["sampling_discrepancy"]
    assert report["c0"]["quality"] > 0.9 > report["odd"]["quality"]
    # the flipped pairs (a label with an odd index against one with an even index, same group) are named first
    a, b, own, teacher = pairs["odd"][0]
    assert a < b and (a % 2) != (b % 2) and (a // 4) == (b // 4) and own * teacher < 0


def test_default_averages_by_samples_and_still_scores_every_client() -> None:
    updates = [_client(f"c{k}", 150 + 60 * k, seed=k) for k in range(5)] + [_client("odd", 300, seed=7, flip=True)]
    aggregator = FedHarmony()
    assert aggregator.quality_aggregation is False and FedHarmony.paper().quality_aggregation is True
    weights = _weights_at_round(aggregator, updates)
    assert weights == pytest.approx(_share(updates), abs=1e-12)
    report, _ = aggregator.client_report()
    # the disagreeing client is still found and reported, only not weighed down
    assert report["odd"]["quality"] < 0.9 < report["c0"]["quality"]


def test_client_report_matches_the_scores_and_weights() -> None:
    updates = [_client(f"c{k}", 100 + 50 * k, seed=k) for k in range(4)]
    aggregator = FedHarmony()
    aggregator.setup(2)
    result = aggregator.aggregate_round(1, updates)
    assert set(result.client_metrics) == set(result.client_pairs) == {u.client_id for u in updates}
    for update in updates:
        cid = update.client_id
        teacher, mask = aggregator.teacher(cid)
        corr = update.stats.compute(normalization="pearson").float()
        expected = correlation_discrepancy(corr[None], teacher[None], mask)
        assert result.client_metrics[cid]["discrepancy"] == pytest.approx(float(expected), rel=1e-5)
        assert result.client_metrics[cid]["num_samples"] == update.num_samples
        gaps = [abs(own - other) for _, _, own, other in result.client_pairs[cid]]
        assert len(gaps) == 5 and gaps == sorted(gaps, reverse=True)
    assert FedAvg().aggregate_round(1, updates).client_metrics == {}


# ---------------------------------------------------------------------------------------------------- auto blocks
def test_auto_block_range_around_the_kernel_crossover() -> None:
    assert auto_block_range(BLOCK_KERNEL_MIN_LABELS - 1) == (1, 1)
    low, high = auto_block_range(BLOCK_KERNEL_MIN_LABELS)
    assert low >= 2 and high >= low
    assert auto_block_range(983) == (8, 32)


def _block_consensus(num_labels: int, num_groups: int) -> Tensor:
    """A consensus with ``num_groups`` strong blocks and weak noise between them."""
    generator = torch.Generator().manual_seed(0)
    group = torch.arange(num_labels) % num_groups
    noise = 0.02 * torch.rand(num_labels, num_labels, generator=generator)
    corr = torch.where(group[:, None] == group[None, :], 0.6, 0.0) + noise
    corr = 0.5 * (corr + corr.T)
    corr.fill_diagonal_(1.0)
    return corr


def test_auto_blocks_on_both_sides_of_the_crossover() -> None:
    below = _block_consensus(BLOCK_KERNEL_MIN_LABELS - 56, 4)
    low, high = auto_block_range(below.shape[0])
    assert int(spectral_label_blocks(below, "auto", min_blocks=low, max_blocks=high).max()) + 1 == 1
    # the plain eigengap (the paper preset's) finds the 4 blocks, which below the crossover buy no speed
    assert int(spectral_label_blocks(below, "auto").max()) + 1 == 4
    above = _block_consensus(300, 12)
    low, high = auto_block_range(300)
    ids = spectral_label_blocks(above, "auto", min_blocks=low, max_blocks=high)
    assert int(ids.max()) + 1 == 12


def test_auto_blocks_through_the_aggregator() -> None:
    for num_labels, expected in ((BLOCK_KERNEL_MIN_LABELS - 6, 1), (300, 12)):
        aggregator = FedHarmony(t0=1)
        stats = []
        for seed in range(3):
            s = CorrelationStats(num_labels)
            generator = torch.Generator().manual_seed(seed)
            latent = torch.randn(400, 12, generator=generator, dtype=torch.float64)
            group = torch.arange(num_labels) % 12
            logits = 2.0 * latent[:, group] + torch.randn(400, num_labels, generator=generator, dtype=torch.float64)
            s.update(torch.sigmoid(logits), torch.ones(400, num_labels, dtype=torch.float64))
            stats.append(ClientUpdate(str(seed), {"w": torch.zeros(1)}, 400, s))
        result = aggregator.aggregate_round(1, stats)
        assert result.metrics["num_blocks"] == expected, num_labels


def test_proximal_mu_per_local_epoch() -> None:
    weights = {"w": torch.zeros(2)}
    aggregator = FedHarmony(proximal_scaling="epochs")
    aggregator.setup(10, local_epochs=5)
    assert aggregator.configure_round(1, ["a"], weights)["a"].proximal_mu == pytest.approx(0.002)
    fixed = FedHarmony()
    fixed.setup(10, local_epochs=5)
    assert fixed.configure_round(1, ["a"], weights)["a"].proximal_mu == 0.01
    # the runner tells the aggregator its local epochs
    federation = pinned_federation(FedHarmony(proximal_scaling="epochs"), num_rounds=1)
    federation.local_epochs = 2
    federation.fit()
    assert federation.aggregator.local_epochs == 2 and federation.model.fedharmony_proximal_mu == 0.005
    with pytest.raises(
        ValueError, match=r"`proximal_scaling` to be one of \('drift', 'epochs', 'none'\), but got 'steps'"
    ):
        FedHarmony(proximal_scaling="steps")
