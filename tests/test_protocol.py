"""The client protocol: validation (one error naming client and field) and the array round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.pinned import pinned_federation

from lightning_fedharmony import FedAvg, Instruction, ProtocolError, Update
from lightning_fedharmony.aggregators.base import ClientInstructions, ClientUpdate, InconsistentClientUpdates
from lightning_fedharmony.stats import CorrelationStats
from lightning_fedharmony.transports.folder import FolderMailbox, FolderTransport


def _weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}


def _stats() -> CorrelationStats:
    stats = CorrelationStats(3)
    stats.update(torch.rand(20, 3, generator=torch.Generator().manual_seed(0)), torch.randint(0, 2, (20, 3)))
    return stats


def test_old_names_are_the_protocol():
    assert ClientInstructions is Instruction and ClientUpdate is Update and InconsistentClientUpdates is ProtocolError


def test_instruction_round_trip():
    teacher = torch.tensor([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    mask = ~torch.eye(3, dtype=torch.bool)
    sent = Instruction(
        weights=_weights(),
        teacher=teacher,
        mask=mask,
        alignment_weight=0.3,
        proximal_mu=0.0,
        corr_normalization="bernoulli",
        corr_eps=1e-5,
        detach_marginals=False,
        corr_momentum=0.5,
        local_epochs=2,
        server_round=4,
        seed=123,
        collect_stats=True,
    )
    got = Instruction.from_arrays(sent.to_arrays(), client_id="0")
    assert all(torch.equal(got.weights[k], v) for k, v in sent.weights.items())
    assert torch.equal(got.teacher, teacher) and torch.equal(got.mask, mask)
    assert got.settings() == sent.settings()
    assert Instruction.from_arrays(Instruction(weights=_weights()).to_arrays(), "0").settings() == {}


def test_update_round_trip():
    sent = Update("3", _weights(), 20, stats=_stats(), metrics={"train_loss": float("nan"), "seconds": 1.5})
    got = Update.from_arrays(sent.to_arrays(), client_id="3", reference=_weights())
    assert got.client_id == "3" and got.num_samples == 20 and got.metrics["seconds"] == 1.5
    assert all(torch.equal(got.stats.state_dict()[k], v) for k, v in sent.stats.state_dict().items())


def test_zero_dim_weights_keep_their_shape():
    weights = {**_weights(), "num_batches_tracked": torch.tensor(3)}
    got = Update.from_arrays(Update("3", weights, 20).to_arrays(), reference=weights)
    assert got.weights["num_batches_tracked"].shape == () and int(got.weights["num_batches_tracked"]) == 3
    instruction = Instruction.from_arrays(Instruction(weights=weights).to_arrays(), client_id="3")
    assert instruction.weights["num_batches_tracked"].shape == ()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"corr_eps": -1.0}, "corr_eps"),
        ({"corr_normalization": "spearman"}, "corr_normalization"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"detach_marginals": 1}, "detach_marginals"),
        ({"teacher": torch.eye(3)}, "mask"),
        ({"teacher": torch.full((3, 3), 2.0), "mask": torch.ones(3, 3, dtype=torch.bool)}, "teacher"),
        ({"weights": {"w": torch.tensor([float("nan")])}}, "weights.w"),
    ],
)
def test_malformed_instruction(change, field):
    instruction = Instruction(**{"weights": _weights(), **change})
    with pytest.raises(ProtocolError, match=rf"Client '7', field `{field}`") as info:
        instruction.validate("7")
    assert info.value.client_id == "7" and info.value.field == field


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda a: a.update(num_samples=np.asarray(0)), "num_samples"),
        (lambda a: a.update(client_id=np.asarray("9")), "client_id"),
        (lambda a: a.pop("stats.sum_outer"), "stats.sum_outer"),
        (lambda a: a.update({"weights.w": np.zeros((3, 3), np.float32)}), "weights.w"),
        (lambda a: a.update(extra=np.asarray(1)), "extra"),
    ],
)
def test_malformed_update(edit, field):
    arrays = Update("3", _weights(), 20, stats=_stats()).to_arrays()
    edit(arrays)
    with pytest.raises(ProtocolError, match=rf"Client '3', field `{field}`"):
        Update.from_arrays(arrays, client_id="3", reference=_weights())


class _BadAggregator(FedAvg):
    def client_instructions(self, server_round, client_id, global_weights):
        instruction = super().client_instructions(server_round, client_id, global_weights)
        instruction.corr_momentum = 1.5
        return instruction


def test_federation_rejects_a_malformed_instruction():
    federation = pinned_federation(_BadAggregator(), num_rounds=1)
    with pytest.raises(ProtocolError, match=r"Client '0', field `corr_momentum`"):
        federation.fit()


def test_folder_transport_rejects_a_malformed_update(tmp_path):
    federation = pinned_federation(FedAvg(), num_rounds=1)
    clients = list(federation.clients)
    remote = type(federation)(
        federation.model,
        clients,
        FedAvg(),
        1,
        transport=FolderTransport(tmp_path, poll_interval=0.01),
        client_timeout=1.0,
        verbose=False,
    )
    instructions = remote.complete_instructions(1, remote.aggregator.configure_round(1, clients, remote.global_weights))
    mailbox = FolderMailbox(tmp_path)
    ids = {cid: mailbox.send_instruction(cid, instructions[cid]) for cid in clients}
    good = Update("0", dict(remote.global_weights), 10)
    mailbox.send_update(good, answers=ids["0"])
    bad = Update("1", dict(remote.global_weights), 10)
    bad.num_samples = 0
    arrays = Update("1", dict(remote.global_weights), 10).to_arrays()
    arrays["num_samples"] = np.asarray(0)
    from lightning_fedharmony.exchange import FORMAT_VERSION, write_npz

    meta = {"format_version": FORMAT_VERSION, "kind": "update", "client_id": "1", "answers": ids["1"]}
    write_npz(mailbox.path("update", "1"), arrays, meta)
    collected = remote.transport.collect(remote, 1, instructions, 0)
    assert [u.client_id for u in collected.updates] == ["0"]
    assert "Client '1', field `num_samples`" in collected.failures["1"]
    assert "no update within client_timeout" in collected.failures["2"]
    with pytest.raises(ProtocolError, match=r"Client '1', field `num_samples`"):
        mailbox.send_update(bad, answers=ids["1"])
