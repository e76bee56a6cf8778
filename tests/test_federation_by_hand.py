"""The issue's acceptance test: a two-client FedHarmony federation driven by hand for two rounds.

Two Lightning Trainers train two clients whose labels come in pairs that move together on client ``a`` and against
each other on client ``b``; ``a`` holds three times as much data, so the sample-weighted consensus keeps the pairs as
clear label blocks (with equal sizes the consensus of opposite correlations is ~0 and its blocks are noise). The
``CorrelationExchange`` callback carries the clients' statistics to the ``FedHarmony`` aggregator and its teachers
back, through a shared folder. In round 2 each client is taught the other client's correlation: the alignment term
must be clearly non-zero and must fall during local training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import TinyMLP, make_loader, make_trainer, paired_label_data

from lightning_fedharmony import CorrelationExchange, DirectoryExchange, FedHarmony, load_model_weights, model_weights
from lightning_fedharmony.aggregators import ClientUpdate

CLIENTS = ("a", "b")
NUM_SAMPLES = {"a": 384, "b": 128}
BATCH_SIZE = 32
LOCAL_EPOCHS = 5  # 60 and 20 local steps per round
ALIGNMENT_WEIGHT = 10.0  # the Bernoulli soft phi of predictions is small: lambda must be large to matter
ALIGN = "train/fedharmony_align_loss"


def test_two_clients_two_rounds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = {
        "a": paired_label_data(NUM_SAMPLES["a"], anti=False, seed=0),
        "b": paired_label_data(NUM_SAMPLES["b"], anti=True, seed=1),
    }
    exchange = DirectoryExchange(tmp_path / "exchange")
    aggregator = FedHarmony.paper(alignment_weight=ALIGNMENT_WEIGHT, t0=2)
    aggregator.setup(num_rounds=2)
    global_weights = model_weights(TinyMLP(num_labels=4))
    align_steps: dict[int, dict[str, list[float]]] = {}
    round_one_corr = {}

    for server_round in (1, 2):
        instructions = aggregator.configure_round(server_round, list(CLIENTS), global_weights)
        updates = []
        align_steps[server_round] = {}
        for cid in CLIENTS:
            inst = instructions[cid]
            model = TinyMLP(num_labels=4, lr=0.03)
            load_model_weights(model, inst.weights)
            model.fedharmony_configure(alignment_weight=inst.alignment_weight, proximal_mu=inst.proximal_mu)
            if inst.teacher is not None:
                exchange.publish_teacher(cid, inst.teacher, inst.mask, version=server_round)
            callback = CorrelationExchange(str(tmp_path / "exchange"), client_id=cid)
            trainer = make_trainer(max_epochs=LOCAL_EPOCHS, callbacks=[callback])
            trainer.fit(model, make_loader(*data[cid], batch_size=BATCH_SIZE))

            payload = exchange.read_stats(cid)
            assert payload is not None and payload.version == LOCAL_EPOCHS
            assert float(payload.stats.num_samples) == NUM_SAMPLES[cid]
            updates.append(ClientUpdate(cid, model_weights(model), NUM_SAMPLES[cid], payload.stats))
            align_steps[server_round][cid] = model.logged[ALIGN]
            if server_round == 1:
                assert inst.teacher is None and not model.fedharmony_has_teacher
                assert ALIGN not in trainer.callback_metrics
                round_one_corr[cid] = payload.stats.compute()
            else:
                assert inst.teacher is not None and inst.mask is not None
                assert callback.teacher_version == 2
                assert torch.equal(model.fedharmony_teacher, inst.teacher)
                assert torch.equal(model.fedharmony_mask, inst.mask)
                # the pairs the clients disagree on are in-block: they are aligned
                assert inst.mask[0, 1] and inst.mask[2, 3]
                assert inst.teacher[0, 1] * round_one_corr[cid][0, 1] < 0  # the teacher is the other client's
                assert ALIGN in trainer.callback_metrics
        result = aggregator.aggregate_round(server_round, updates, global_weights)
        assert sum(result.client_weights.values()) == pytest.approx(1.0)
        global_weights = result.weights

    # the clients disagree: pairs (0, 1) and (2, 3) move together on a and against each other on b
    for first, second in ((0, 1), (2, 3)):
        assert round_one_corr["a"][first, second] > 0.2
        assert round_one_corr["b"][first, second] < -0.2

    assert not any(align_steps[1].values())  # round 1: no teacher, no alignment term
    for cid in CLIENTS:
        steps = align_steps[2][cid]
        assert len(steps) == LOCAL_EPOCHS * NUM_SAMPLES[cid] // BATCH_SIZE
        assert all(value > 0 for value in steps)
        first, last = sum(steps[:5]) / 5, sum(steps[-5:]) / 5
        assert first > 0.02, f"client {cid}: the alignment term is too small to mean anything ({first:.2e})"
        # over 16 seeds last / first was at most 0.025 and first at least 0.07
        assert last < 0.25 * first, f"client {cid}: the alignment term did not fall ({first:.4f} -> {last:.4f})"
