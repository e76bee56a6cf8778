"""The package's top level: user-facing names only; the pieces behind them stay importable from their modules."""

from __future__ import annotations

import importlib

import lightning_fedharmony

USER_FACING = {
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
}


def test_top_level_exports_the_user_facing_names_sorted():
    assert set(lightning_fedharmony.__all__) == USER_FACING
    assert lightning_fedharmony.__all__ == sorted(lightning_fedharmony.__all__)
    assert all(hasattr(lightning_fedharmony, name) for name in USER_FACING)


def test_internals_live_in_their_modules():
    internals = {
        "lightning_fedharmony.aggregators": (
            "AggregationResult",
            "Aggregator",
            "ClientInstructions",
            "ClientUpdate",
            "InconsistentClientUpdates",
            "RoundAggregation",
        ),
        "lightning_fedharmony.aggregators.consensus_sums": ("ConsensusSums", "SumsRound"),
        "lightning_fedharmony.client_terms": ("ConsensusMemory", "share_teacher"),
        "lightning_fedharmony.protocol": ("ConsensusShare", "ConsensusTerm", "Evaluation"),
        "lightning_fedharmony.exchange": ("Exchange",),
    }
    for module, names in internals.items():
        for name in names:
            assert hasattr(importlib.import_module(module), name)
            assert name not in lightning_fedharmony.__all__
