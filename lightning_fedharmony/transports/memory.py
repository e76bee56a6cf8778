"""Clients trained in this process, one after the other, each with a fresh Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lightning_fedharmony.faults import UpdateCollector, time_limit
from lightning_fedharmony.protocol import Evaluation, Instruction
from lightning_fedharmony.transports.base import Transport

if TYPE_CHECKING:
    from lightning_fedharmony.orchestrator import Federation


class InMemoryTransport(Transport):
    """Train each selected client's datamodule with the federation's module, in turn, under ``client_timeout``."""

    def collect(
        self, federation: Federation, server_round: int, instructions: Mapping[str, Instruction], attempt: int
    ) -> UpdateCollector:
        # here, not at the top: the client module uses the folder transport, and this package imports both
        from lightning_fedharmony.client import quiet_lightning, train_client

        collected = federation.new_collector()
        with quiet_lightning():
            for cid, instruction in instructions.items():
                try:
                    with time_limit(federation.client_timeout, cid):
                        update, loss, setup = train_client(
                            federation.model,
                            federation.clients[cid],  # type: ignore[arg-type]
                            cid,
                            instruction,
                            trainer_kwargs=federation.trainer_kwargs,
                            stats_noise_multiplier=federation.stats_noise_multiplier,
                            stats_clip=federation.stats_clip,
                            memory=None if instruction.consensus is None else federation.consensus_memory(cid),
                        )
                except Exception as err:  # a failing client must not end the federation
                    collected.fail(cid, f"{type(err).__name__}: {' '.join(str(err).split())}")
                    continue
                collected.add(update, loss, setup)
        return collected

    def evaluate(
        self, federation: Federation, server_round: int, requests: Mapping[str, Instruction]
    ) -> tuple[list[Evaluation], dict[str, str]]:
        from lightning_fedharmony.client import evaluate_client

        evaluations, failures = [], {}
        for cid, request in requests.items():
            try:
                with time_limit(federation.client_timeout, cid):
                    evaluation = evaluate_client(federation.model, federation.clients[cid], cid, request)
                evaluation.validate(request.eval_bins, check_bins=True)
            except Exception as err:  # a failing client must not end the federation
                failures[cid] = f"{type(err).__name__}: {' '.join(str(err).split())}"
                continue
            evaluations.append(evaluation)
        return evaluations, failures
