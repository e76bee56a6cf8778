"""FedAvg (McMahan et al., AISTATS 2017) and FedProx (Li et al., MLSys 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_fedharmony.aggregators.base import Aggregator, ClientInstructions, ClientUpdate, sample_weights


class FedAvg(Aggregator):
    """Weighted average of client models by sample count.

    Example:
        >>> import torch
        >>> from lightning_fedharmony.aggregators import ClientUpdate
        >>> updates = [ClientUpdate("a", {"w": torch.zeros(2)}, 30), ClientUpdate("b", {"w": torch.ones(2)}, 10)]
        >>> FedAvg().aggregate_round(1, updates).weights
        {'w': tensor([0.2500, 0.2500])}
    """

    def client_weights(self, server_round: int, updates: Sequence[ClientUpdate]) -> tuple[Tensor, dict[str, float]]:
        return sample_weights(updates), {}


class FedProx(FedAvg):
    """FedAvg whose clients add the proximal term ``mu / 2 ||w - w_global||^2`` to their loss.

    Args:
        proximal_mu: ``mu``; with Adam, values as small as 1e-3 work best (METHOD.md section 9).
    """

    requires_mixin = True

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if not proximal_mu >= 0:
            raise ValueError(f"Expected argument `proximal_mu` to be >= 0, but got {proximal_mu!r}.")
        self.proximal_mu = float(proximal_mu)

    def client_instructions(
        self, server_round: int, client_id: str, global_weights: Mapping[str, Tensor]
    ) -> ClientInstructions:
        return ClientInstructions(weights=dict(global_weights), proximal_mu=self.proximal_mu, proximal_scaling="none")
