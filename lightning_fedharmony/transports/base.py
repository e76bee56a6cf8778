"""The one thing runners differ in: how a round's instructions reach the clients and their updates come back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lightning_fedharmony.faults import UpdateCollector
from lightning_fedharmony.protocol import Evaluation, Instruction

if TYPE_CHECKING:
    from lightning_fedharmony.orchestrator import Federation


class Transport(ABC):
    """Moves one round's messages for :class:`~lightning_fedharmony.orchestrator.Federation`.

    The federation selects clients, asks the aggregator for their instructions, and hands them here; the transport
    returns the screened updates (:class:`~lightning_fedharmony.faults.UpdateCollector`: usable updates, failures
    with their reasons). Everything else (retries, aggregation, evaluation, checkpoints, history) is the federation's.
    """

    #: whether the clients live elsewhere (the federation then holds their ids only, not their datamodules)
    remote: bool = False

    @abstractmethod
    def collect(
        self, federation: Federation, server_round: int, instructions: Mapping[str, Instruction], attempt: int
    ) -> UpdateCollector:
        """Send each selected client its instruction and collect the updates (failures recorded, never raised)."""

    def evaluate(
        self, federation: Federation, server_round: int, requests: Mapping[str, Instruction]
    ) -> tuple[list[Evaluation], dict[str, str]]:
        """Send each client its evaluation request (the global weights) and collect the evaluations of its held-out
        split, in the order of ``requests``, with the failures (client id -> reason; never raised).

        The default evaluates nowhere: a transport of its own without this step records every client as failed.
        """
        return [], {cid: f"{type(self).__name__} does not evaluate on clients" for cid in requests}

    def finish(self, federation: Federation) -> None:
        """Called once after the last round (tell remote clients the run is over)."""
