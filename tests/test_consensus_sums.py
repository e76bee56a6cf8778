"""FedHarmony with ``leave_one_out="client"``: a server that keeps only the consensus sums gives the teachers of the
server that keeps every client's correlation, scores and weights by the stated rule, and memory that does not grow
with the clients."""

from __future__ import annotations

import functools
import shutil
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers.resume import assert_same_weights, run_interrupted

from lightning_fedharmony import FedHarmony, orchestrator
from lightning_fedharmony.aggregators import ClientUpdate
from lightning_fedharmony.checkpoint import (
    CHECKPOINT_NAME,
    CLIENT_STATE_NAME,
    CheckpointError,
    CheckpointMismatchError,
    client_file_name,
    load_checkpoint,
    read_client_states,
    save_checkpoint,
)
from lightning_fedharmony.client_terms import ConsensusMemory, share_teacher
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.functional import (
    aggregation_weights,
    correlation_discrepancy,
    quality_from_discrepancy,
    sampling_discrepancy,
    weighted_average,
)
from lightning_fedharmony.integrations.flower.wire import (
    instruction_from_records,
    instruction_to_records,
    update_from_records,
    update_to_records,
)
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation
from lightning_fedharmony.protocol import Instruction, ProtocolError, Update
from lightning_fedharmony.stats import CorrelationStats

NUM_LABELS = 6
REPO = Path(__file__).resolve().parents[1]


def _stats(seed: int, samples: int, dead_label: int | None = None) -> CorrelationStats:
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(samples, 2, generator=generator)
    noise = 0.3 * torch.rand(samples, NUM_LABELS - 2, generator=generator)
    preds = torch.cat([base, base.repeat(1, 2) + noise], 1).clamp(0, 1)
    target = (preds > 0.5).float()
    if dead_label is not None:  # never positive: invalid for this client
        target[:, dead_label] = 0
    stats = CorrelationStats(NUM_LABELS)
    stats.update(preds, target)
    return stats


def _weights(seed: int) -> dict[str, torch.Tensor]:
    # an integer entry too, like BatchNorm's counter: not averaged, taken from the client with the largest weight
    generator = torch.Generator().manual_seed(1000 + seed)
    return {"w": torch.randn(3, generator=generator), "count": torch.tensor(seed, dtype=torch.int64)}


# (round, clients taking part, samples per client): partial participation leaves stale terms behind
SCHEDULE = [(1, ["0", "1", "2", "3"]), (2, ["0", "2"]), (3, ["1", "2", "3"]), (4, ["0", "1", "3"])]
SAMPLES = {"0": 40, "1": 25, "2": 60, "3": 33}
DEAD = {"1": 4, "3": 5}


def _run_both(**kwargs) -> list[dict]:
    """Both servers over the same client statistics; per round, each participant's teacher from either side."""
    server = FedHarmony(leave_one_out="server", num_blocks=2, t0=3, **kwargs)
    client = FedHarmony(leave_one_out="client", num_blocks=2, t0=3, **kwargs)
    memories = {cid: ConsensusMemory() for cid in SAMPLES}
    rounds = []
    for server_round, participants in SCHEDULE:
        global_weights = _weights(0)
        sent = client.configure_round(server_round, participants, global_weights)
        teachers = {}
        stats_updates, term_updates = [], []
        for cid in participants:
            resolved = memories[cid].resolve(sent[cid], cid)
            stats = _stats(100 * server_round + int(cid), SAMPLES[cid], DEAD.get(cid))
            update = Update(cid, _weights(int(cid) + server_round), SAMPLES[cid], stats)
            stats_updates.append(update)
            if server_round > 1:
                teachers[cid] = (server.teacher(cid), (resolved.teacher, resolved.mask))
            term_updates.append(
                memories[cid].complete(
                    update, stats, server_round, eps=client.corr_eps, normalization=client.corr_normalization
                )
            )
        previous_consensus = server.consensus
        result_server = server.aggregate_round(server_round, stats_updates, global_weights)
        result_client = client.aggregate_round(server_round, iter(term_updates), global_weights)
        rounds.append(
            {
                "teachers": teachers,
                "server": result_server,
                "client": result_client,
                "terms": {u.client_id: u for u in term_updates},
                "stats": {u.client_id: u for u in stats_updates},
                "previous_consensus": previous_consensus,
                "consensus": (server.consensus, client.consensus),
                "blocks": (server.cluster_ids, client._consensus_sums.cluster_ids),
            }
        )
    return rounds


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stale_stats": "drop"}, {"consensus_weighting": "uniform", "align_threshold": 0.05}],
    ids=["keep", "drop", "uniform-threshold"],
)
def test_client_side_teachers_equal_the_server_side_ones(kwargs: dict) -> None:
    for record in _run_both(**kwargs):
        for cid, ((teacher_s, mask_s), (teacher_c, mask_c)) in record["teachers"].items():
            torch.testing.assert_close(teacher_c, teacher_s, atol=1e-6, rtol=0, msg=f"client {cid}")
            assert torch.equal(mask_c, mask_s), cid
        consensus_s, consensus_c = record["consensus"]
        torch.testing.assert_close(consensus_c, consensus_s, atol=1e-6, rtol=0)
        assert torch.equal(*record["blocks"])


def test_scores_weights_and_model_follow_the_teacher_each_client_trained_with() -> None:
    rounds = _run_both(quality_aggregation=True)
    first = rounds[0]["client"]
    # round 1 has no teacher: nobody is scored, the weights are the data shares
    n = torch.tensor([float(SAMPLES[c]) for c in first.client_weights], dtype=torch.float64)
    assert list(first.client_weights.values()) == pytest.approx((n / n.sum()).tolist())
    for index, record in enumerate(rounds[1:], start=1):
        members = {cid for earlier in rounds[:index] for cid in earlier["terms"]}
        result = record["client"]
        ids = list(result.client_weights)
        discrepancy, quality = [], []
        for cid in ids:
            teacher, mask = record["teachers"][cid][0]  # the server's teacher of this round = the one trained with
            stats = record["stats"][cid].stats
            corr = stats.compute(eps=1e-6, normalization="pearson").float()
            term = record["terms"][cid].term
            expected = float(correlation_discrepancy(corr[None], teacher[None], mask))
            assert term.discrepancy == pytest.approx(expected, rel=1e-5, abs=1e-9)
            samples = torch.tensor([float(SAMPLES[cid])])
            others = torch.tensor([float(sum(SAMPLES[c] for c in members if c != cid))])
            baseline = float(sampling_discrepancy(corr[None], teacher[None], mask, samples, others))
            assert term.sampling_discrepancy == pytest.approx(baseline, rel=1e-4)
            discrepancy.append(max(expected - baseline, 0.0))
            quality.append(float(quality_from_discrepancy(torch.tensor([discrepancy[-1]], dtype=torch.float64), 3.0)))
            assert result.client_metrics[cid]["quality"] == pytest.approx(quality[-1], rel=1e-4)
        n = torch.tensor([float(SAMPLES[c]) for c in ids], dtype=torch.float64)
        expected_weights = aggregation_weights(n, torch.tensor(quality, dtype=torch.float64), 2, 3.0, mode="product")
        assert list(result.client_weights.values()) == pytest.approx(expected_weights.tolist(), rel=1e-4)
        expected_model = weighted_average(
            [record["stats"][c].weights for c in ids], list(result.client_weights.values())
        )
        torch.testing.assert_close(result.weights["w"], expected_model["w"])


def test_additive_weights_mix_the_two_running_sums() -> None:
    rounds = _run_both(quality_aggregation=True, quality_weighting="additive")
    for record in rounds:
        result = record["client"]
        ids = list(result.client_weights)
        expected = weighted_average([record["stats"][c].weights for c in ids], list(result.client_weights.values()))
        torch.testing.assert_close(result.weights["w"], expected["w"])
        # the counter of the largest final weight, not of the most samples (they differ in round 3)
        assert torch.equal(result.weights["count"], expected["count"])
        assert sum(result.client_weights.values()) == pytest.approx(1.0)
    most_samples = max(rounds[2]["stats"], key=lambda cid: SAMPLES[cid])
    assert int(rounds[2]["client"].weights["count"]) != int(rounds[2]["stats"][most_samples].weights["count"])


def _term_updates(num_clients: int, num_labels: int, server_round: int = 1) -> Iterator[ClientUpdate]:
    """Updates with terms, as clients of an empty server would send them in round 1, made one at a time."""
    for k in range(num_clients):
        stats = CorrelationStats(num_labels)
        preds = torch.rand(16, num_labels, generator=torch.Generator().manual_seed(k))
        stats.update(preds, (preds > 0.5).float())
        share = FedHarmony(leave_one_out="client").client_instructions(server_round, str(k), {"w": torch.zeros(2)})
        memory = ConsensusMemory()
        memory.resolve(share, str(k))
        update = ClientUpdate(str(k), {"w": torch.full((2,), float(k))}, 16, stats)
        yield memory.complete(update, stats, server_round, eps=1e-6, normalization="pearson")


def test_server_state_does_not_grow_with_the_clients() -> None:
    sizes = []
    for num_clients in (4, 40):
        aggregator = FedHarmony(leave_one_out="client", t0=5)
        aggregator.aggregate_round(1, _term_updates(num_clients, 8), {"w": torch.zeros(2)})
        state = aggregator.state_dict()
        sizes.append(sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)))
    per_client_scalars = 3 * 8 * (40 - 4)  # weight, samples, round of each member
    assert sizes[1] - sizes[0] == per_client_scalars


def test_updates_are_consumed_one_at_a_time() -> None:
    alive: list[weakref.ref] = []

    def updates() -> Iterator[ClientUpdate]:
        for update in _term_updates(6, 5):
            # every update but the one being handed over and the last one taken is gone
            assert sum(ref() is not None for ref in alive) <= 1
            alive.append(weakref.ref(update))
            yield update

    FedHarmony(leave_one_out="client", t0=5).aggregate_round(1, updates(), {"w": torch.zeros(2)})


def test_a_client_whose_term_does_not_match_the_servers_record_is_refused() -> None:
    aggregator = FedHarmony(leave_one_out="client", t0=5)
    aggregator.aggregate_round(1, _term_updates(3, 5), {"w": torch.zeros(2)})
    # a client answering round 2 as if it had no term in the sums (it lost its memory and started afresh)
    fresh = next(_term_updates(1, 5, server_round=2))
    with pytest.raises(ProtocolError, match=r"Client '0', field `term.replaced_round`: expected the term of round 1"):
        aggregator.aggregate_round(2, [fresh], {"w": torch.zeros(2)})


def test_a_client_that_lost_its_term_is_told_with_a_hint() -> None:
    aggregator = FedHarmony(leave_one_out="client", t0=5)
    aggregator.aggregate_round(1, _term_updates(2, 5), {"w": torch.zeros(2)})
    instruction = aggregator.client_instructions(2, "0", {"w": torch.zeros(2)})
    with pytest.raises(ProtocolError, match=r"field `consensus.own_round`.*round 1.*HINT: restore the client's"):
        ConsensusMemory().resolve(instruction, "0")


def test_updates_without_terms_and_unsupported_settings_are_refused() -> None:
    stats = CorrelationStats(4)
    stats.update(torch.rand(8, 4), torch.ones(8, 4))
    with pytest.raises(ProtocolError, match=r"field `term`.*HINT"):
        FedHarmony(leave_one_out="client", t0=5).aggregate_round(
            1, [ClientUpdate("0", {"w": torch.zeros(1)}, 8, stats)]
        )
    with pytest.raises(ValueError, match=r"`gamma` to be a float with `leave_one_out='client'`, but got 'auto'"):
        FedHarmony(leave_one_out="client", gamma="auto")
    with pytest.raises(ValueError, match=r"`consensus_weighting`.*'previous_aggregation'"):
        FedHarmony(leave_one_out="client", consensus_weighting="previous_aggregation")
    with pytest.raises(ValueError, match=r"`leave_one_out` to be one of \('server', 'client'\), but got 'both'"):
        FedHarmony(leave_one_out="both")
    with pytest.raises(RuntimeError, match="each client builds its own"):
        FedHarmony(leave_one_out="client").teacher("0")


def test_share_and_term_travel_in_every_array_form() -> None:
    aggregator = FedHarmony(leave_one_out="client", t0=5)
    aggregator.aggregate_round(1, _term_updates(3, 5), {"w": torch.zeros(2)})
    instruction = aggregator.client_instructions(2, "1", {"w": torch.zeros(2)})
    for back in (
        Instruction.from_arrays(instruction.to_arrays(), "1"),
        instruction_from_records(instruction_to_records(instruction, "1"), "1"),
    ):
        assert back.consensus is not None and instruction.consensus is not None
        assert torch.equal(back.consensus.numerator, instruction.consensus.numerator)
        assert back.consensus.own_round == 1 and back.consensus.weighting == "samples"
    update = next(_term_updates(1, 5))
    for back_update in (Update.from_arrays(update.to_arrays()), update_from_records(update_to_records(update), "0")):
        assert back_update.term is not None and update.term is not None
        assert torch.equal(back_update.term.delta, update.term.delta)
        assert back_update.stats is None
    arrays = instruction.to_arrays()
    arrays["consensus.numerator"] = arrays["consensus.numerator"] * 1e9
    with pytest.raises(ProtocolError, match=r"field `consensus.numerator`: expected finite values within"):
        Instruction.from_arrays(arrays, "1")
    del arrays["consensus.own_round"]
    with pytest.raises(ProtocolError, match=r"field `consensus.own_round`: expected an entry"):
        Instruction.from_arrays(arrays, "1")


def _clients(num: int = 3, n: int = 120) -> list[ClientDataModule]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = (x @ torch.randn(6, 5, generator=generator) > 0.2).float()
    return [ClientDataModule(x[i::num], y[i::num], batch_size=32) for i in range(num)]


def _federation(num_clients: int = 3, **kwargs) -> Federation:
    torch.manual_seed(0)
    aggregator = FedHarmony(leave_one_out="client", num_blocks=2)
    clients = _clients(num_clients)
    return Federation(MultilabelMLP(6, 5, hidden=(8,)), clients, aggregator, 3, verbose=False, **kwargs)


def test_federation_resumes_with_the_clients_memories(tmp_path: Path) -> None:
    straight = _federation(fraction_fit=0.67)
    straight.fit()
    first = _federation(fraction_fit=0.67, checkpoint_dir=tmp_path)
    first.aggregator.setup(3)
    first.run_round(1)
    first.run_round(2)
    assert first.client_memory  # the clients' terms travel in the checkpoint
    resumed = _federation(fraction_fit=0.67, checkpoint_dir=tmp_path)
    resumed.fit()
    for name, tensor in straight.global_weights.items():
        assert torch.equal(tensor, resumed.global_weights[name]), name
    assert resumed.result.rounds[-1].client_weights == straight.result.rounds[-1].client_weights


def test_each_round_rewrites_only_the_memories_of_the_clients_it_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[dict] = []
    original = orchestrator.write_client_states

    def spy(folder, states, *, fresh=False):
        written.append({"fresh": fresh, "clients": sorted(states)})
        original(folder, states, fresh=fresh)

    monkeypatch.setattr(orchestrator, "write_client_states", spy)
    federation = _federation(fraction_fit=0.34, checkpoint_dir=tmp_path, num_clients=6)
    federation.aggregator.setup(3)
    selected = []
    for server_round in (1, 2, 3):
        federation.run_round(server_round)
        selected.append(sorted(federation.select_clients(server_round)))
    assert [w["clients"] for w in written] == selected
    assert [w["fresh"] for w in written] == [True, False, False]
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert "client_memory" not in state and state["client_state"] == CLIENT_STATE_NAME
    files = read_client_states(tmp_path / CLIENT_STATE_NAME)
    assert files.keys() == federation.client_memory.keys() == set().union(*selected)
    for cid, memory in federation.client_memory.items():
        saved = files[cid]
        assert saved.keys() == memory.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in memory.state_dict().items()), cid


def _resumed_after(tmp_path: Path, interrupt: Callable[[Federation], None]) -> tuple[Federation, Federation]:
    """Rounds 1 and 2 checkpointed, then ``interrupt`` (what a crash or an earlier version leaves on disk), then a
    run that resumes from it: its weights equal those of a run without interruption. Six clients, three per round."""
    straight, resumed = run_interrupted(
        functools.partial(_federation, num_clients=6, fraction_fit=0.34), tmp_path, 2, interrupt
    )
    assert [r.server_round for r in resumed.result.rounds] == [1, 2, 3]
    assert_same_weights(straight.global_weights, resumed.global_weights)
    assert resumed.result.rounds[-1].client_weights == straight.result.rounds[-1].client_weights
    return straight, resumed


def test_memories_a_round_ahead_of_the_checkpoint_resume_to_the_same_weights(tmp_path: Path) -> None:
    def killed_before_the_checkpoint_of_round_3(first: Federation) -> None:
        after_round_2 = (tmp_path / CHECKPOINT_NAME).read_bytes()
        first.run_round(3)  # writes the files of round 3's clients, then the checkpoint, which is put back
        (tmp_path / CHECKPOINT_NAME).write_bytes(after_round_2)

    _resumed_after(tmp_path, killed_before_the_checkpoint_of_round_3)


def test_a_checkpoint_holding_the_memories_inline_still_resumes(tmp_path: Path) -> None:
    def earlier_layout(_: Federation) -> None:  # every memory inside the checkpoint, no clients' files
        state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
        state["client_memory"] = read_client_states(tmp_path / CLIENT_STATE_NAME)
        del state["client_state"], state["version"]
        save_checkpoint(tmp_path / CHECKPOINT_NAME, state)
        shutil.rmtree(tmp_path / CLIENT_STATE_NAME)

    straight, _ = _resumed_after(tmp_path, earlier_layout)
    # the round after the resume wrote every memory it restored, not only its own clients'
    assert read_client_states(tmp_path / CLIENT_STATE_NAME).keys() == straight.client_memory.keys()


def test_a_fresh_run_clears_the_clients_files_of_an_earlier_one(tmp_path: Path) -> None:
    _federation(checkpoint_dir=tmp_path).fit()
    (tmp_path / CHECKPOINT_NAME).unlink()  # start over in the same folder
    stale = tmp_path / CLIENT_STATE_NAME / client_file_name("gone")
    stale.write_bytes((tmp_path / CLIENT_STATE_NAME / client_file_name("0")).read_bytes())
    federation = _federation(checkpoint_dir=tmp_path)
    federation.aggregator.setup(3)
    federation.run_round(1)
    assert not stale.exists()


def test_a_damaged_client_file_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    _federation(checkpoint_dir=tmp_path).fit()
    damaged = tmp_path / CLIENT_STATE_NAME / client_file_name("1")
    damaged.write_bytes(b"not a torch file")
    readable = r"federation\.client_state/1-[0-9a-f]{16}\.pt: expected a readable .*HINT"
    with pytest.raises(CheckpointError, match=readable):
        _federation(checkpoint_dir=tmp_path).fit()
    # a file that holds another client's state
    damaged.write_bytes((tmp_path / CLIENT_STATE_NAME / client_file_name("0")).read_bytes())
    other = r"1-[0-9a-f]{16}\.pt: expected the state of the client this file is named after, but it holds client '0'"
    with pytest.raises(CheckpointError, match=other):
        _federation(checkpoint_dir=tmp_path).fit()
    for path in (tmp_path / CLIENT_STATE_NAME).glob("*.pt"):
        path.unlink()
    (tmp_path / CLIENT_STATE_NAME).rmdir()
    with pytest.raises(CheckpointError, match=r"federation\.client_state: expected the clients' state .* missing"):
        _federation(checkpoint_dir=tmp_path).fit()


def test_client_file_names_are_plain_distinct_and_short() -> None:
    ids = ["0", "site-3", "a_b", "../x", "a b", "a%20b", ".", "..", "ü", "a/b", "a\\b", "A", "a", "CON", "字" * 300]
    names = [client_file_name(cid) for cid in ids]
    assert names[1].startswith("site-3-") and names[-2].startswith("CON-")
    assert len({n.lower() for n in names}) == len(ids)  # distinct on case-insensitive file systems too
    assert all("/" not in n and "\\" not in n and not n.startswith(".") and len(n) <= 68 for n in names)


def test_a_client_file_the_checkpoint_counts_but_lost_is_a_checkpoint_error(tmp_path: Path) -> None:
    first = _federation(num_clients=6, fraction_fit=0.34, checkpoint_dir=tmp_path)
    first.aggregator.setup(3)
    first.run_round(1)
    (tmp_path / CLIENT_STATE_NAME / client_file_name(first.select_clients(1)[0])).unlink()
    with pytest.raises(CheckpointError, match=r"client_state: expected the state of every client .* 1 have no file"):
        _federation(num_clients=6, fraction_fit=0.34, checkpoint_dir=tmp_path).fit()


def test_share_teacher_of_a_client_outside_the_sums_is_the_whole_consensus() -> None:
    aggregator = FedHarmony(leave_one_out="client", t0=5, num_blocks=1)
    aggregator.aggregate_round(1, _term_updates(3, 5), {"w": torch.zeros(2)})
    share = aggregator.client_instructions(2, "newcomer", {"w": torch.zeros(2)}).consensus
    assert share is not None and share.own_weight == 0
    teacher, mask = share_teacher(share, None)
    torch.testing.assert_close(teacher, aggregator.consensus)
    assert bool(mask.any()) and not bool(mask.diagonal().any())


def test_federation_streams_updates_and_records_a_refused_term_as_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    original = ConsensusMemory.complete

    def complete(self, update, *args, **kwargs):
        done = original(self, update, *args, **kwargs)
        if update.client_id == "1" and done.term is not None:  # a client that weighs its own term wrongly
            done.term.weight += 1.0
        return done

    monkeypatch.setattr(ConsensusMemory, "complete", complete)
    federation = _federation(min_clients=2)
    federation.aggregator.setup(3)
    record = federation.run_round(1)
    assert set(record.client_weights) == {"0", "2"}
    assert record.failures["1"].startswith("rejected update: Client '1', field `term.weight`: expected")
    assert federation.aggregator.state_dict()["member_ids"] == ["0", "2"]


def test_every_share_of_a_round_reads_the_same_published_sums() -> None:
    aggregator = FedHarmony(leave_one_out="client", t0=5)
    aggregator.aggregate_round(1, _term_updates(3, 5), {"w": torch.zeros(2)})
    sent = aggregator.configure_round(2, ["0", "1", "2"], {"w": torch.zeros(2)})
    shares = [sent[cid].consensus for cid in "012"]
    assert all(s is not None for s in shares)
    numerators = {s.numerator.data_ptr() for s in shares if s is not None}
    assert len(numerators) == 1  # converted to float32 once per round, not once per client


def test_files_the_checkpoint_does_not_count_are_not_read_and_are_swept(tmp_path: Path) -> None:
    def leftovers(_: Federation) -> None:  # another run's damaged file and a write killed mid-way, in both folders
        (tmp_path / CLIENT_STATE_NAME / client_file_name("gone")).write_bytes(b"not a torch file")
        (tmp_path / CLIENT_STATE_NAME / f".{client_file_name('0')}.x1.tmp").write_bytes(b"half")
        (tmp_path / f".{CHECKPOINT_NAME}.x2.tmp").write_bytes(b"half")

    _, resumed = _resumed_after(tmp_path, leftovers)  # resumes: the damaged file is not the checkpoint's
    left = sorted(p.name for p in (tmp_path / CLIENT_STATE_NAME).iterdir())
    assert left == sorted(client_file_name(cid) for cid in resumed.client_memory)
    assert not list(tmp_path.glob(".*.tmp"))


def test_another_setup_is_named_before_the_clients_files_are_read(tmp_path: Path) -> None:
    _federation(checkpoint_dir=tmp_path).fit()
    (tmp_path / CLIENT_STATE_NAME / client_file_name("1")).write_bytes(b"not a torch file")
    torch.manual_seed(0)
    other = Federation(
        MultilabelMLP(6, 5, hidden=(8,)),
        _clients(3),
        FedHarmony(leave_one_out="client", num_blocks=3),
        3,
        verbose=False,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(CheckpointMismatchError, match="num_blocks"):
        other.fit()


def test_an_emptied_memory_keeps_its_file_until_the_checkpoint_stops_counting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _federation(checkpoint_dir=tmp_path)
    first.aggregator.setup(3)
    first.run_round(1)
    record = first.run_round(2)  # its checkpoint is written again below, as if round 2 ended there
    own = tmp_path / CLIENT_STATE_NAME / client_file_name("0")
    assert own.exists()
    # client 0's memory empties (its term dropped) and the run dies while writing the next checkpoint
    first.client_memory["0"] = ConsensusMemory()
    first._memory_touched.add("0")

    def killed(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(orchestrator, "save_checkpoint", killed)
    with pytest.raises(OSError, match="killed"):
        first._save_round(record)
    assert own.exists()  # the checkpoint on disk still counts it
    monkeypatch.undo()
    resumed = _federation(checkpoint_dir=tmp_path)
    resumed.restore(tmp_path / CHECKPOINT_NAME)
    assert resumed.client_memory["0"].rounds()
    first._save_round(record)  # the write goes through: the new checkpoint no longer counts client 0
    assert not own.exists() and "0" not in load_checkpoint(tmp_path / CHECKPOINT_NAME)["client_state_ids"]
