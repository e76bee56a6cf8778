"""Server strategies: ``configure_round`` (what each selected client gets) and ``aggregate_round``."""

from lightning_fedharmony.aggregators.base import (
    AggregationResult,
    Aggregator,
    ClientInstructions,
    ClientUpdate,
    InconsistentClientUpdates,
    RoundAggregation,
    validate_updates,
)
from lightning_fedharmony.aggregators.fedavg import FedAvg, FedProx
from lightning_fedharmony.aggregators.fedharmony import FedHarmony

__all__ = [
    "AggregationResult",
    "Aggregator",
    "ClientInstructions",
    "ClientUpdate",
    "FedAvg",
    "FedHarmony",
    "FedProx",
    "InconsistentClientUpdates",
    "RoundAggregation",
    "validate_updates",
]
