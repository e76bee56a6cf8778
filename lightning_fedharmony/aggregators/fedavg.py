"""FedAvg (McMahan et al., AISTATS 2017) and FedProx (Li et al., MLSys 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_fedharmony.aggregators.base import Aggregator, ClientInstructions, ClientUpdate, sample_weights


class FedAvg(Aggregator):
    """Weighted average of client models by sample count.

    Args:
        server_momentum: server momentum ``beta`` in ``[0, 1)`` (FedAvgM, Hsu et al. 2019); 0 is the plain average.
        server_momentum_adaptive: scale the momentum kept from earlier rounds by its agreement with the round's
            update (:func:`~lightning_fedharmony.functional.server_momentum_step`).

    Example:
        >>> import torch
        >>> from lightning_fedharmony.aggregators import ClientUpdate
        >>> updates = [ClientUpdate("a", {"w": torch.zeros(2)}, 30), ClientUpdate("b", {"w": torch.ones(2)}, 10)]
        >>> FedAvg().aggregate_round(1, updates).weights
        {'w': tensor([0.2500, 0.2500])}
    """

    def __init__(self, server_momentum: float = 0.0, server_momentum_adaptive: bool = True) -> None:
        self.set_server_momentum(server_momentum, server_momentum_adaptive)

    def client_weights(self, server_round: int, updates: Sequence[ClientUpdate]) -> tuple[Tensor, dict[str, float]]:
        return sample_weights(updates), {}


class FedProx(FedAvg):
    """FedAvg whose clients add the proximal term ``mu / 2 ||w - w_global||^2`` to their loss.

    Args:
        proximal_mu: ``mu``; with Adam, values as small as 1e-3 work best (METHOD.md section 9).
        server_momentum: as in :class:`FedAvg`.
        server_momentum_adaptive: as in :class:`FedAvg`.
    """

    requires_mixin = True

    def __init__(
        self, proximal_mu: float = 0.01, server_momentum: float = 0.0, server_momentum_adaptive: bool = True
    ) -> None:
        if not proximal_mu >= 0:
            raise ValueError(f"Expected argument `proximal_mu` to be >= 0, but got {proximal_mu!r}.")
        super().__init__(server_momentum, server_momentum_adaptive)
        self.proximal_mu = float(proximal_mu)

    def client_instructions(
        self, server_round: int, client_id: str, global_weights: Mapping[str, Tensor]
    ) -> ClientInstructions:
        return ClientInstructions(
            weights=dict(global_weights),
            proximal_mu=self.proximal_mu,
            proximal_scaling="none",
            proximal_rows="uniform",
            proximal_reference_labels=0.0,
        )
