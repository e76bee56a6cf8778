"""`proximal_rows="labels"`: the output layer's rows pulled per label by the positives a client has seen; and
`proximal_reference_labels`: `mu` scaled up for models over few labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.models import NUM_LABELS, TinyMLP, multilabel_data
from helpers.pinned import pinned_federation, weights_digest
from torch import Tensor, nn

from lightning_fedharmony import FedHarmony, FedProx
from lightning_fedharmony.functional import (
    label_count_proximal_scale,
    label_proximal_scale,
    proximal_term,
    row_proximal_term,
)
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.protocol import Instruction, ProtocolError

MU = 0.5


def test_label_proximal_scale() -> None:
    scale = label_proximal_scale(torch.tensor([0.0, 8.0, 32.0, 500.0]), full_at=32.0, absent=10.0)
    torch.testing.assert_close(scale, torch.tensor([10.0, 0.25, 1.0, 1.0]))
    # integer counts work, and absent = 0 leaves the rows of unseen labels free
    assert label_proximal_scale(torch.tensor([0, 4]), full_at=8, absent=0.0).tolist() == [0.0, 0.5]
    with pytest.raises(ValueError, match=r"`full_at` to be a finite number > 0, but got 0"):
        label_proximal_scale(torch.ones(2), full_at=0, absent=1.0)
    with pytest.raises(ValueError, match=r"`absent` to be a finite number >= 0, but got -1\.0"):
        label_proximal_scale(torch.ones(2), full_at=1.0, absent=-1.0)
    with pytest.raises(ValueError, match=r"`positives` of shape \(L,\), but got \(2, 2\)"):
        label_proximal_scale(torch.ones(2, 2), full_at=1.0, absent=1.0)


def test_row_proximal_term_against_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator, requires_grad=True)
    bias = torch.randn(3, generator=generator, requires_grad=True)
    anchors = [torch.randn(3, 4, generator=generator), torch.randn(3, generator=generator)]
    row_mu = torch.tensor([0.0, 1.0, 4.0])
    term = row_proximal_term([weight, bias], anchors, row_mu)
    expected = sum(
        0.5 * row_mu[j] * (((weight[j] - anchors[0][j]) ** 2).sum() + (bias[j] - anchors[1][j]) ** 2) for j in range(3)
    )
    torch.testing.assert_close(term, expected)
    weight_grad, bias_grad = torch.autograd.grad(term, [weight, bias])
    torch.testing.assert_close(weight_grad, row_mu[:, None] * (weight - anchors[0]).detach())
    torch.testing.assert_close(bias_grad, row_mu * (bias - anchors[1]).detach())
    # one mu for every row is FedProx's term
    torch.testing.assert_close(
        row_proximal_term([weight, bias], anchors, torch.full((3,), MU)), proximal_term([weight, bias], anchors, MU)
    )
    with pytest.raises(ValueError, match=r"first dimension is the 3 labels, but got \(4,\)"):
        row_proximal_term([torch.zeros(4)], [torch.zeros(4)], row_mu)
    with pytest.raises(ValueError, match=r"as many global parameters as local ones, but got 1 and 2"):
        row_proximal_term([weight, bias], [anchors[0]], row_mu)
    with pytest.raises(ValueError, match=r"`row_mu` of shape \(L,\) and >= 0, but got shape \(3,\)"):
        row_proximal_term([weight, bias], anchors, torch.tensor([0.0, -1.0, 1.0]))


def _displaced_model(**kwargs: object) -> tuple[TinyMLP, list[Tensor]]:
    torch.manual_seed(0)
    model = TinyMLP(proximal_mu=MU, alignment_weight=0.0)
    model.fedharmony_configure(**kwargs)  # type: ignore[arg-type]
    model.fedharmony_set_anchor()
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, anchor


def test_the_mixin_pulls_each_output_row_by_the_positives_seen_this_round() -> None:
    model, anchor = _displaced_model()
    model.fedharmony_configure(proximal_rows="labels", proximal_full_at=8.0, proximal_absent=3.0)
    x, y = multilabel_data(16, seed=1)
    y[:, 0] = 0.0  # label 0 has no positive
    y[:, 1] = 0.0
    y[:4, 1] = 1.0  # label 1 has 4 of the 8 positives that give the full pull
    logits = model(x)
    loss = model.fedharmony_loss(logits, y)
    params = list(model.parameters())
    positives = y.sum(0)
    row_mu = MU * label_proximal_scale(positives, full_at=8.0, absent=3.0)
    assert row_mu[0] == 3.0 * MU and row_mu[1] == 0.5 * MU
    expected = (
        F.binary_cross_entropy_with_logits(logits, y)
        + proximal_term(params[:2], anchor[:2], MU)
        + row_proximal_term(params[2:], anchor[2:], row_mu)
    )
    torch.testing.assert_close(loss, expected)
    # the counts add up over the round's batches, and a new anchor (a new round) starts them again
    model.fedharmony_loss(model(x), y)
    torch.testing.assert_close(model._fedharmony_positives, 2 * positives)
    model.fedharmony_set_anchor()
    model.fedharmony_loss(model(x), y)
    torch.testing.assert_close(model._fedharmony_positives, positives)


def test_unobserved_entries_are_not_positives() -> None:
    model, _ = _displaced_model(proximal_rows="labels")
    x, y = multilabel_data(8, seed=2)
    y[:, 2] = 1.0
    observed = torch.ones_like(y, dtype=torch.bool)
    observed[:, 2] = False
    model.fedharmony_loss(model(x), y, observed)
    assert model._fedharmony_positives[2] == 0.0


def test_soft_labels_count_by_their_value() -> None:
    model, _ = _displaced_model(proximal_rows="labels")
    x, _ = multilabel_data(4, seed=4)
    soft = torch.full((4, NUM_LABELS), 0.25)
    model.fedharmony_loss(model(x), soft)
    torch.testing.assert_close(model._fedharmony_positives, torch.ones(NUM_LABELS))


def test_well_supported_rows_train_as_with_uniform_rows() -> None:
    x, y = multilabel_data(32, seed=3)
    y[:, :] = 1.0  # every label has 32 positives, at full_at = 32
    losses = []
    for rows in ("uniform", "labels"):
        model, _ = _displaced_model(proximal_rows=rows, proximal_full_at=32.0)
        losses.append(model.fedharmony_loss(model(x), y))
    torch.testing.assert_close(losses[0], losses[1])


def test_output_parameters_default_and_override() -> None:
    model, _ = _displaced_model()
    assert model.fedharmony_output_parameters() == [model.net[2].weight, model.net[2].bias]
    mlp = MultilabelMLP(4, 3, hidden=(5,))
    assert mlp.fedharmony_output_parameters() == [mlp.net[-1].weight, mlp.net[-1].bias]

    class NormHead(TinyMLP):
        """Ends in a normalization layer of the labels' width: the default still finds the last linear layer."""

        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            self.norm = nn.LayerNorm(NUM_LABELS)

    normed = NormHead()
    assert normed.fedharmony_output_parameters() == [normed.net[2].weight, normed.net[2].bias]

    class HeadFirst(TinyMLP):
        """Registers a linear layer after the output layer: the default finds the wrong parameters."""

        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            self.extra = nn.Linear(2, 7)

    torch.manual_seed(0)
    wrong = HeadFirst(proximal_mu=MU, alignment_weight=0.0)
    wrong.fedharmony_configure(proximal_rows="labels")
    wrong.fedharmony_set_anchor()
    x, y = multilabel_data(8)
    with pytest.raises(ValueError, match=rf"first dimension is the {NUM_LABELS} labels, but got shapes \[\(7, 2\), "):
        wrong.fedharmony_loss(wrong(x), y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proximal_rows": "columns"}, r"`proximal_rows` to be one of \('uniform', 'labels'\), but got 'columns'"),
        ({"proximal_full_at": 0}, r"`proximal_full_at` to be a finite number > 0, but got 0"),
        ({"proximal_full_at": float("inf")}, r"`proximal_full_at` to be a finite number > 0, but got inf"),
        ({"proximal_absent": -1.0}, r"`proximal_absent` to be a finite number >= 0, but got -1\.0"),
        ({"proximal_absent": True}, r"`proximal_absent` to be a finite number >= 0, but got True"),
        ({"proximal_reference_labels": -1}, r"`proximal_reference_labels` to be a finite number >= 0, but got -1"),
        ({"proximal_reference_labels": "22"}, r"`proximal_reference_labels` to be a finite number >= 0, but got '22'"),
    ],
)
def test_mixin_errors(kwargs: dict, match: str) -> None:
    model = TinyMLP()
    with pytest.raises(ValueError, match=match):
        model.fedharmony_configure(**kwargs)


def test_servers_send_the_rows_rule_and_the_protocol_checks_it() -> None:
    weights = {"w": torch.zeros(2)}
    default = FedHarmony().client_instructions(1, "0", weights)
    assert (default.proximal_rows, default.proximal_full_at, default.proximal_absent) == ("labels", 64.0, 10.0)
    assert FedHarmony.paper().client_instructions(1, "0", weights).proximal_rows == "uniform"
    assert FedProx().client_instructions(1, "0", weights).proximal_rows == "uniform"  # FedProx's, whatever came before
    arrays = Instruction(
        weights=weights, proximal_rows="labels", proximal_full_at=16.0, proximal_absent=0.0
    ).to_arrays()
    back = Instruction.from_arrays(arrays, "0")
    assert (back.proximal_rows, back.proximal_full_at, back.proximal_absent) == ("labels", 16.0, 0.0)
    for field, value, rule in [
        ("proximal_rows", "columns", "one of"),
        ("proximal_full_at", 0.0, "> 0"),
        ("proximal_absent", -1.0, ">= 0"),
    ]:
        bad = dict(arrays, **{field: value})
        with pytest.raises(ProtocolError, match=rf"Client '0', field `{field}`: expected a value {rule}"):
            Instruction.from_arrays(bad, "0")
    with pytest.raises(ValueError, match=r"`proximal_rows` to be one of \('uniform', 'labels'\), but got 'all'"):
        FedHarmony(proximal_rows="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`proximal_full_at` to be a finite number > 0, but got -2"):
        FedHarmony(proximal_full_at=-2)
    with pytest.raises(ValueError, match=r"`proximal_absent` to be a finite number >= 0, but got nan"):
        FedHarmony(proximal_absent=float("nan"))


def test_a_federation_trains_differently_with_label_rows() -> None:
    """The setting reaches the clients and moves the weights (the paper preset's and the uniform rule's are pinned in
    ``test_defaults.py``)."""
    digests = {}
    for rows in ("labels", "uniform"):
        federation = pinned_federation(FedHarmony(proximal_rows=rows, seed=0), num_rounds=2)  # type: ignore[arg-type]
        federation.fit()
        digests[rows] = weights_digest(federation.global_weights)
        assert federation.model.fedharmony_proximal_rows == rows
    assert digests["labels"] != digests["uniform"]


# ---------------------------------------------------------------------------------------- the label-count factor


def test_label_count_proximal_scale() -> None:
    assert label_count_proximal_scale(6, 22.0) == 22.0 / 6
    assert label_count_proximal_scale(22, 22.0) == 1.0
    assert label_count_proximal_scale(153, 22.0) == 1.0  # at or above the reference, `mu` is kept
    assert label_count_proximal_scale(1, 0.0) == 1.0  # 0 turns the factor off
    with pytest.raises(ValueError, match=r"`reference` to be a finite number >= 0, but got -1\.0"):
        label_count_proximal_scale(6, -1.0)
    with pytest.raises(ValueError, match=r"`reference` to be a finite number >= 0, but got inf"):
        label_count_proximal_scale(6, float("inf"))
    with pytest.raises(ValueError, match=r"`num_labels` to be a positive int, but got 0"):
        label_count_proximal_scale(0, 22.0)


@pytest.mark.parametrize("rows", ["uniform", "labels"])
def test_the_mixin_scales_mu_by_the_label_count(rows: str) -> None:
    """With ``L`` labels below the reference the whole term (hidden layers and output rows) is the term of ``mu``
    times ``reference / L``; at or above the reference it is the term of ``mu``."""
    x, y = multilabel_data(16, seed=5)
    losses = {}
    for reference, mu in ((4 * NUM_LABELS, MU), (0.0, 4 * MU), (NUM_LABELS, MU), (0.0, MU)):
        model, _ = _displaced_model(proximal_rows=rows, proximal_reference_labels=reference)
        model.fedharmony_configure(proximal_mu=mu)
        losses[reference, mu] = model.fedharmony_loss(model(x), y)
    torch.testing.assert_close(losses[4 * NUM_LABELS, MU], losses[0.0, 4 * MU])
    torch.testing.assert_close(losses[NUM_LABELS, MU], losses[0.0, MU])
    assert not torch.allclose(losses[4 * NUM_LABELS, MU], losses[0.0, MU])


def test_servers_send_the_label_count_reference_and_the_protocol_checks_it() -> None:
    weights = {"w": torch.zeros(2)}
    assert FedHarmony().client_instructions(1, "0", weights).proximal_reference_labels == 22.0
    assert FedHarmony.paper().client_instructions(1, "0", weights).proximal_reference_labels == 0.0
    # FedProx's term, whatever an earlier method left in the module
    assert FedProx().client_instructions(1, "0", weights).proximal_reference_labels == 0.0
    arrays = Instruction(weights=weights, proximal_reference_labels=50.0).to_arrays()
    assert Instruction.from_arrays(arrays, "0").proximal_reference_labels == 50.0
    with pytest.raises(ProtocolError, match=r"Client '0', field `proximal_reference_labels`: expected a value >= 0"):
        Instruction.from_arrays(dict(arrays, proximal_reference_labels=-3.0), "0")
    with pytest.raises(ValueError, match=r"`proximal_reference_labels` to be a finite number >= 0, but got nan"):
        FedHarmony(proximal_reference_labels=float("nan"))
    # the module of a federation follows the server's setting
    federation = pinned_federation(FedHarmony(proximal_reference_labels=30.0, seed=0), num_rounds=1)
    federation.fit()
    assert federation.model.fedharmony_proximal_reference_labels == 30.0
    assert MultilabelMLP(4, 3, proximal_reference_labels=8.0).fedharmony_proximal_reference_labels == 8.0


def test_the_label_count_reference_travels_in_flower_records() -> None:
    pytest.importorskip("flwr")
    from lightning_fedharmony.integrations.flower.wire import instruction_from_records, instruction_to_records

    instruction = FedHarmony().client_instructions(1, "3", {"w": torch.zeros(2)})
    records = instruction_to_records(instruction, "3")
    assert records.config_records["config"]["proximal-reference-labels"] == 22.0
    assert instruction_from_records(records, "3").proximal_reference_labels == 22.0
