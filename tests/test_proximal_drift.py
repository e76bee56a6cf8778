"""`proximal_scaling="drift"`: the proximal pull held at its size after a round's first local epoch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.models import TinyMLP, multilabel_data
from helpers.pinned import pinned_federation, weights_digest

from lightning_fedharmony import FedHarmony, FedProx
from lightning_fedharmony.functional import drift_proximal_scale, parameter_distance, proximal_term
from lightning_fedharmony.protocol import Instruction, ProtocolError

MU = 0.5


def test_drift_proximal_scale_and_parameter_distance() -> None:
    assert drift_proximal_scale(2.0, 5.0) == pytest.approx(0.4)
    assert drift_proximal_scale(2.0, 1.0) == 1.0  # the drift came back: mu is never raised
    assert drift_proximal_scale(0.0, 3.0) == drift_proximal_scale(3.0, 0.0) == 1.0
    with pytest.raises(ValueError, match=r"non-negative distances, but got `first_epoch_distance`=-1\.0"):
        drift_proximal_scale(-1.0, 2.0)
    params = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    assert parameter_distance(params, [torch.zeros(2), torch.zeros(1, 1)]) == 5.0
    with pytest.raises(ValueError, match=r"as many global parameters as local ones, but got 1 and 2"):
        parameter_distance(params, [torch.zeros(2)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parameter_distance_of_16_bit_weights_is_exact(dtype: torch.dtype) -> None:
    # 2048 and -0.5 are exact in both dtypes, their difference 2048.5 in neither (it rounds to 2048)
    local, anchor = torch.tensor([2048.0, 3.0], dtype=dtype), torch.tensor([-0.5, 3.0], dtype=dtype)
    assert float((local - anchor)[0]) == 2048.0
    assert parameter_distance([local], [anchor]) == 2048.5
    # float32 weights subtract in float32, as before, so the distances of float32 runs do not move
    local32, anchor32 = torch.tensor([1.0]), torch.tensor([-(2.0**-30)])
    assert parameter_distance([local32], [anchor32]) == float(local32 - anchor32) == 1.0


class _Epochs:
    """Stands in for the Trainer's epoch counter, which the drift rule reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.epoch = 0
        monkeypatch.setattr(TinyMLP, "current_epoch", property(lambda _: self.epoch))


def _prox_in_loss(model: TinyMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(x)
    return float(model.fedharmony_loss(logits, y) - F.binary_cross_entropy_with_logits(logits, y))


def _move(model: TinyMLP, anchor: list[torch.Tensor], distance: float, seed: int) -> None:
    """Put the parameters at ``distance`` from the anchor."""
    generator = torch.Generator().manual_seed(seed)
    steps = [torch.randn(a.shape, generator=generator) for a in anchor]
    norm = parameter_distance(steps, [torch.zeros_like(s) for s in steps])
    with torch.no_grad():
        for p, a, s in zip(model.parameters(), anchor, steps):
            p.copy_(a + s * (distance / norm))


def test_the_mixin_holds_the_pull_at_its_size_after_the_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = _Epochs(monkeypatch)
    torch.manual_seed(0)
    model = TinyMLP(proximal_mu=MU, log_loss_parts=False)
    model.fedharmony_configure(proximal_scaling="drift")
    x, y = multilabel_data(16, seed=0)
    model.fedharmony_set_anchor()
    anchor = [p.detach().clone() for p in model.parameters()]
    # (epoch, distance at its first step, distance later in the epoch, expected factor on mu for the whole epoch)
    schedule = [(0, 0.0, 0.5, 1.0), (1, 0.5, 0.9, 1.0), (2, 1.0, 1.6, 0.5), (3, 2.0, 2.5, 0.25), (4, 0.4, 0.1, 1.0)]
    for epoch, start, later, factor in schedule:
        epochs.epoch = epoch
        for distance in (start, later):  # the factor is measured once, at the epoch's first step
            _move(model, anchor, distance, seed=epoch)
            expected = float(proximal_term([p.detach() for p in model.parameters()], anchor, MU * factor))
            assert _prox_in_loss(model, x, y) == pytest.approx(expected, rel=1e-5, abs=1e-7), (epoch, distance)
    # a new anchor (the next round) starts over
    model.fedharmony_set_anchor()
    anchor = [p.detach().clone() for p in model.parameters()]
    epochs.epoch = 5
    _move(model, anchor, 3.0, seed=9)
    assert _prox_in_loss(model, x, y) == pytest.approx(
        float(proximal_term([p.detach() for p in model.parameters()], anchor, MU))
    )
    # "none" keeps mu whatever the drift
    model.fedharmony_configure(proximal_scaling="none")
    epochs.epoch = 8
    assert _prox_in_loss(model, x, y) == pytest.approx(
        float(proximal_term([p.detach() for p in model.parameters()], anchor, MU))
    )
    with pytest.raises(ValueError, match=r"`proximal_scaling` to be one of \('none', 'drift'\), but got 'epochs'"):
        model.fedharmony_configure(proximal_scaling="epochs")


def test_servers_send_their_scaling_and_the_protocol_checks_it() -> None:
    weights = {"w": torch.zeros(2)}
    assert FedHarmony().client_instructions(1, "0", weights).proximal_scaling == "drift"
    assert FedHarmony(proximal_scaling="epochs").client_instructions(1, "0", weights).proximal_scaling == "none"
    assert FedHarmony.paper().client_instructions(1, "0", weights).proximal_scaling == "none"
    assert FedProx().client_instructions(1, "0", weights).proximal_scaling == "none"
    arrays = Instruction(weights=weights, proximal_mu=0.01, proximal_scaling="drift").to_arrays()
    assert Instruction.from_arrays(arrays, "0").proximal_scaling == "drift"
    arrays["proximal_scaling"] = "linear"
    with pytest.raises(ProtocolError, match=r"Client '0', field `proximal_scaling`: expected a value one of"):
        Instruction.from_arrays(arrays, "0")


@pytest.mark.parametrize(("local_epochs", "same"), [(1, True), (2, True), (3, False), (4, False)])
def test_one_or_two_local_epochs_are_unaffected_and_more_are_not(local_epochs: int, same: bool) -> None:
    """The factor compares each later epoch's start with the second's: it can differ from 1 from the third epoch."""
    digests = {}
    for scaling in ("drift", "none"):
        aggregator = FedHarmony(proximal_scaling=scaling, seed=0)  # type: ignore[arg-type]
        federation = pinned_federation(aggregator, num_rounds=2, local_epochs=local_epochs)
        federation.fit()
        digests[scaling] = weights_digest(federation.global_weights)
    assert (digests["drift"] == digests["none"]) is same
