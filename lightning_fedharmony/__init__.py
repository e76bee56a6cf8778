"""lightning-fedharmony: federated multi-label learning for PyTorch Lightning (FedHarmony, arXiv:2604.28024)."""

from lightning_fedharmony.__about__ import __version__
from lightning_fedharmony.aggregators import (
    AggregationResult,
    Aggregator,
    ClientInstructions,
    ClientUpdate,
    FedAvg,
    FedHarmony,
    FedProx,
    InconsistentClientUpdates,
)
from lightning_fedharmony.callback import CorrelationExchange
from lightning_fedharmony.client import FederatedClient, install
from lightning_fedharmony.exchange import DirectoryExchange, Exchange, InMemoryExchange, PayloadError
from lightning_fedharmony.mixin import FedHarmonyMixin, load_model_weights, model_weights
from lightning_fedharmony.orchestrator import Federation, FederationError, FederationResult
from lightning_fedharmony.protocol import Instruction, ProtocolError, Update
from lightning_fedharmony.stats import CorrelationStats

__all__ = [
    "AggregationResult",
    "Aggregator",
    "ClientInstructions",
    "ClientUpdate",
    "CorrelationExchange",
    "CorrelationStats",
    "DirectoryExchange",
    "Exchange",
    "FedAvg",
    "FedHarmony",
    "FedHarmonyMixin",
    "FedProx",
    "FederatedClient",
    "Federation",
    "FederationError",
    "FederationResult",
    "InMemoryExchange",
    "InconsistentClientUpdates",
    "Instruction",
    "PayloadError",
    "ProtocolError",
    "Update",
    "__version__",
    "install",
    "load_model_weights",
    "model_weights",
]
