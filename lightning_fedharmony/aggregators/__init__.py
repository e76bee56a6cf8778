"""Server strategies: ``configure_round`` (what each selected client gets) and ``aggregate_round``."""

from lightning_fedharmony.aggregators.base import (
    AggregationResult,
    Aggregator,
    ClientInstructions,
    ClientUpdate,
    InconsistentClientUpdates,
    validate_updates,
)
from lightning_fedharmony.aggregators.fedavg import FedAvg, FedProx
from lightning_fedharmony.aggregators.fedharmony import FedHarmony

# FedHarmony's needs, declared here while its module is being reworked elsewhere; they belong in its class body
FedHarmony.requires_stats = True
FedHarmony.requires_mixin = True

__all__ = [
    "AggregationResult",
    "Aggregator",
    "ClientInstructions",
    "ClientUpdate",
    "FedAvg",
    "FedHarmony",
    "FedProx",
    "InconsistentClientUpdates",
    "validate_updates",
]
