"""Run the library's federation on Flower (``flwr`` 1.42, Message API): a Strategy and a ClientApp factory.

The :class:`FedHarmonyStrategy` does no math of its own: every round it asks the library's
:class:`~lightning_fedharmony.aggregators.Aggregator` what to send each client (``configure_round``) and how to combine
the replies (``aggregate_round``), so FedAvg, FedProx and FedHarmony (Kou et al., CVPR 2026,
https://arxiv.org/abs/2604.28024) run on Flower exactly as in :class:`~lightning_fedharmony.orchestrator.Federation`.
The ClientApp built by :func:`make_client_app` runs the same
:func:`~lightning_fedharmony.orchestrator.train_client` step with the same seed, so for one seed, partition and
number of rounds both runners reach the same model.

What travels is the client protocol (:class:`~lightning_fedharmony.protocol.Instruction`,
:class:`~lightning_fedharmony.protocol.Update`): their array form (``to_arrays`` / ``from_arrays``, the same one the
folder transport writes) mapped onto Flower's records, arrays into ``ArrayRecord``, scalars into ``ConfigRecord`` /
``MetricRecord``, under kebab-case keys defined once (:class:`Key`); each message is validated by the protocol alone,
and a malformed one raises :class:`~lightning_fedharmony.protocol.ProtocolError` naming the client and the entry.

- server -> client, one fresh :class:`~flwr.app.RecordDict` per message: ``arrays`` (global weights),
  ``config`` (the instruction's settings: round, seed, local epochs, loss weights; and the ``client-id`` it is for)
  and, for FedHarmony after round 1, ``teacher`` (that client's leave-one-out consensus ``teacher`` and ``mask``);
- client -> server: ``arrays`` (its weights), ``metrics`` (``num-examples``, ``train-loss``,
  ``trainer-setup-seconds``), ``client`` (its ``client-id``) and, for FedHarmony, ``stats``: the raw float64 sums of
  its predictions, so the server's pooled statistics are exact.

Clients are identified by their partition id (``node_config["partition-id"]``, set by the simulation engine or by
``flower-supernode --node-config "partition-id=0 num-partitions=2"``): the strategy asks new nodes for it with a
``query`` message and selects clients among partition ids with the rule of ``Federation.select_clients``.

The package's rooms: :mod:`.wire` (Flower's records <-> the client protocol), :mod:`.strategy` (the server) and
:mod:`.client_app` (the clients).
"""

# the import gate: first, so that a missing or blocked flwr fails here with the extra to install
try:
    import flwr  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover - exercised by simulating the missing extra
    if err.name is not None and err.name.split(".")[0] != "flwr":
        raise
    raise ModuleNotFoundError(
        "`lightning_fedharmony.integrations.flower` needs Flower (`flwr`), which is not installed."
        " HINT: pip install 'lightning-fedharmony[flower]'",
        name="flwr",
    ) from err

from lightning_fedharmony.integrations.flower.client_app import DataModuleFn, ModelFn, make_client_app, partition_id
from lightning_fedharmony.integrations.flower.strategy import FedHarmonyStrategy, make_evaluate_fn
from lightning_fedharmony.integrations.flower.wire import (
    Key,
    arrays_to_weights,
    evaluation_from_records,
    evaluation_to_records,
    instruction_from_records,
    instruction_to_records,
    update_from_records,
    update_to_records,
    weights_to_arrays,
)

__all__ = [
    "DataModuleFn",
    "FedHarmonyStrategy",
    "Key",
    "ModelFn",
    "arrays_to_weights",
    "evaluation_from_records",
    "evaluation_to_records",
    "instruction_from_records",
    "instruction_to_records",
    "make_client_app",
    "make_evaluate_fn",
    "partition_id",
    "update_from_records",
    "update_to_records",
    "weights_to_arrays",
]
