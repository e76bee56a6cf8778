"""lightning-fedharmony: federated multi-label learning for PyTorch Lightning (FedHarmony, arXiv:2604.28024).

The names here are the user-facing ones; the pieces behind them (``Aggregator``, ``AggregationResult``, the old
protocol names ``ClientInstructions`` / ``ClientUpdate`` / ``InconsistentClientUpdates``, ``Exchange``) are imported
from their modules: :mod:`lightning_fedharmony.aggregators`, :mod:`lightning_fedharmony.exchange`.
"""

from lightning_fedharmony.__about__ import __version__
from lightning_fedharmony.aggregators import FedAvg, FedHarmony, FedProx
from lightning_fedharmony.callback import CorrelationExchange
from lightning_fedharmony.client import FederatedClient, install
from lightning_fedharmony.exchange import DirectoryExchange, InMemoryExchange, PayloadError
from lightning_fedharmony.mixin import FedHarmonyMixin, load_model_weights, model_weights
from lightning_fedharmony.orchestrator import Federation, FederationError, FederationResult
from lightning_fedharmony.protocol import Instruction, ProtocolError, Update
from lightning_fedharmony.stats import CorrelationStats

__all__ = [
    "CorrelationExchange",
    "CorrelationStats",
    "DirectoryExchange",
    "FedAvg",
    "FedHarmony",
    "FedHarmonyMixin",
    "FedProx",
    "FederatedClient",
    "Federation",
    "FederationError",
    "FederationResult",
    "InMemoryExchange",
    "Instruction",
    "PayloadError",
    "ProtocolError",
    "Update",
    "__version__",
    "install",
    "load_model_weights",
    "model_weights",
]
