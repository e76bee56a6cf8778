"""The pieces of a round that every runner shares, so that they pick, seed, retry and evaluate alike: seeds, client
selection, the runner's part of an instruction, retries of a round with too few updates, a client's validation batches,
the evaluation of global weights and the merging of the clients' evaluations (:class:`~lightning_fedharmony.Federation`,
``fedharmony serve`` and the Flower strategy)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fedharmony.metrics import MultilabelReport
from lightning_fedharmony.mixin import load_model_weights
from lightning_fedharmony.protocol import Evaluation, Instruction

if TYPE_CHECKING:
    from lightning_fedharmony.faults import UpdateCollector

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """A round could not complete; the federation keeps its last good global model."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the federation's seed, the round, the client index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


#: How :func:`select_clients` samples a round's clients.
CLIENT_SAMPLING = ("uniform", "size")
#: Keeps the evaluation sample of a round apart from its training sample.
_EVALUATION_SALT = 0xE7A1
#: Modes of federated evaluation: exact scores, binned counts (private), none.
FEDERATED_EVAL = ("exact", "binned", "none")


def check_client_sampling(client_sampling: object) -> str:
    """``client_sampling`` if it is one of :data:`CLIENT_SAMPLING`.

    Raises:
        ValueError: naming the options otherwise.
    """
    if not isinstance(client_sampling, str) or client_sampling not in CLIENT_SAMPLING:
        raise ValueError(
            f"Expected argument `client_sampling` to be one of {CLIENT_SAMPLING}, but got {client_sampling!r}."
        )
    return client_sampling


def check_client_sizes(sizes: object, num_clients: int) -> np.ndarray:
    """The clients' data sizes as a float64 array ``(K,)``: finite, non-negative, with a positive sum.

    Raises:
        ValueError: on another shape or a value outside the rule.
    """
    try:
        array = np.asarray(sizes, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != (num_clients,) or not np.isfinite(array).all() or (array < 0).any() or array.sum() <= 0:
        raise ValueError(
            f"Expected the clients' sizes to be {num_clients} finite numbers >= 0 with a positive sum (one per client),"
            f" but got {sizes if array.size <= 8 else f'{array.size} values'}."
        )
    return array


def size_proportional_sample(sizes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct indices drawn in proportion to ``sizes``, without replacement; sorted.

    Successive sampling: each draw picks one of the clients not yet drawn with probability proportional to its size
    (the distribution of ``rng.choice(K, count, replace=False, p=sizes / sizes.sum())``), computed in one pass as the
    ``count`` smallest keys ``E_k / n_k`` with ``E_k ~ Exp(1)`` (Efraimidis and Spirakis, 2006). A single draw
    (``count == 1``) picks client ``k`` with probability exactly ``n_k / sum(n)``. Clients of size 0 are drawn only
    when the others cannot fill ``count``, lowest index first.

    Args:
        sizes: ``(K,)`` non-negative sizes with a positive sum.
        count: how many indices, in ``[0, K]``.
        rng: the generator (seeded by the caller).

    Returns:
        ``(count,)`` int64 indices, ascending.

    Example:
        >>> size_proportional_sample(np.array([1.0, 0.0, 1000.0, 1.0]), 1, np.random.default_rng(0)).tolist()
        [2]
    """
    num_clients = sizes.shape[0]
    if count >= num_clients:
        return np.arange(num_clients, dtype=np.int64)
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    positive = sizes > 0
    keys: np.ndarray = np.where(
        positive, rng.standard_exponential(num_clients) / np.where(positive, sizes, 1.0), np.inf
    )
    chosen = np.argpartition(keys, count - 1)[:count]
    if np.isinf(keys[chosen]).any():  # size-0 clients fill the sample: a stable order breaks their ties by index
        chosen = np.argsort(keys, kind="stable")[:count]
    return np.sort(chosen).astype(np.int64)


def sample_size(num_clients: int, fraction_fit: float = 1.0, min_clients: int = 1) -> int:
    """Clients per round: ``max(min_clients, ceil(fraction_fit * K))``, at most ``K``."""
    return min(num_clients, max(min_clients, math.ceil(fraction_fit * num_clients)))


def client_seed(seed: int, server_round: int, index: int, attempt: int = 0) -> int:
    """The training seed of client ``index`` in a round's ``attempt`` (0 = the first; every retry gets fresh seeds)."""
    return derive_seed(seed, server_round, index, *((attempt,) if attempt else ()))


def complete_instruction(
    instruction: Instruction,
    client_id: str,
    *,
    server_round: int,
    local_epochs: int,
    seed: int,
    collect_stats: bool,
) -> Instruction:
    """The aggregator's instruction with what the runner decides (the round, ``local_epochs``, the client's seed,
    whether statistics are needed), validated (a consensus share's values aside: the aggregator's own sums, shared
    by every client's instruction).

    Raises:
        ProtocolError: an instruction with a malformed field (names the client and the field).
    """
    complete = replace(
        instruction, server_round=server_round, local_epochs=local_epochs, seed=seed, collect_stats=collect_stats
    )
    complete.validate(client_id, consensus_values=False)
    return complete


def collect_with_retries(
    collect: Callable[[int], UpdateCollector],
    server_round: int,
    num_selected: int,
    *,
    min_clients: int,
    round_retries: int,
    kept: str = "",
    logger: logging.Logger = log,
) -> tuple[UpdateCollector, int]:
    """A round's screened updates: ``collect(attempt)`` for attempt 0, 1, ... (the runner sends the selected clients
    their instructions with that attempt's fresh seeds) until at least ``min_clients`` updates are usable, at most
    ``round_retries + 1`` times.

    Args:
        collect: sends one attempt's instructions and returns what came back (failures recorded, never raised).
        server_round: the round, for the messages.
        num_selected: how many clients were selected, for the messages.
        min_clients: fewest usable updates for the round to count.
        round_retries: how many times a round with too few usable updates is tried again.
        kept: what the runner keeps when the round fails, appended to the error.
        logger: where the warning about a failed attempt goes.

    Returns:
        The collector of the attempt that succeeded, and the number of attempts made.

    Raises:
        FederationError: if every attempt brought fewer than ``min_clients`` usable updates (names the failures).
    """
    for attempt in range(round_retries + 1):
        collected = collect(attempt)
        if len(collected.updates) >= min_clients:
            return collected, attempt + 1
        logger.warning(
            "round %d, attempt %d: %d usable updates, fewer than min_clients=%d; failures: %s",
            server_round,
            attempt + 1,
            len(collected.updates),
            min_clients,
            collected.failures,
        )
    raise FederationError(
        f"Round {server_round}: {len(collected.updates)} of {num_selected} clients returned usable updates in"
        f" each of {round_retries + 1} attempt(s), fewer than `min_clients`={min_clients}. Failures:"
        f" {collected.failures}.{kept}"
    )


def evaluation_clients(client_ids: Sequence[str], server_round: int, fraction: float = 1.0, seed: int = 0) -> list[str]:
    """The clients asked to evaluate a round's global model: all, or a uniform sample of ``ceil(fraction * K)`` (at
    least one), seeded by the round apart from the training selection; the same rule wherever the server runs. A
    population of thousands of clients evaluates a sample, as it trains one."""
    if fraction >= 1.0:
        return list(client_ids)
    return select_clients(client_ids, server_round, fraction_fit=fraction, seed=derive_seed(seed, _EVALUATION_SALT))


def select_clients(
    client_ids: Sequence[str],
    server_round: int,
    *,
    fraction_fit: float = 1.0,
    min_clients: int = 1,
    seed: int = 0,
    client_sampling: str = "uniform",
    sizes: Sequence[float] | np.ndarray | None = None,
) -> list[str]:
    """The clients of a round: all, or a sample of ``max(min_clients, ceil(fraction_fit * K))`` seeded by the round.

    The same rule wherever the server runs (:class:`Federation`, the Flower strategy), so both pick the same clients.
    Its cost grows with the sample, not with ``K`` (uniform: Floyd's algorithm in numpy; ``"size"``: one vectorised
    pass over the ``K`` sizes).

    Args:
        client_ids: every registered client, in a fixed order (the order decides who a seeded draw picks).
        server_round: the round, which seeds the draw with ``seed``.
        fraction_fit: share of the clients to pick.
        min_clients: fewest clients to pick.
        seed: the federation's seed.
        client_sampling: ``"uniform"`` (every client equally likely) or ``"size"`` (in proportion to ``sizes``,
            without replacement: see :func:`size_proportional_sample`; the paper's FLAIR setting).
        sizes: ``(K,)`` the clients' data sizes, in the order of ``client_ids`` (``"size"`` only).

    Returns:
        The selected ids, in the order of ``client_ids``.

    Raises:
        ValueError: on an unknown ``client_sampling``, or ``"size"`` without valid ``sizes``.

    Example:
        >>> select_clients(["0", "1", "2", "3"], 1, fraction_fit=0.5, seed=7)
        ['2', '3']
    """
    check_client_sampling(client_sampling)
    ids = client_ids if isinstance(client_ids, Sequence) else list(client_ids)
    weights = None
    if client_sampling == "size":
        if sizes is None:
            raise ValueError(
                "Expected the clients' sizes with `client_sampling='size'`, but got none."
                " HINT: pass `sizes`, one data size per client id."
            )
        weights = check_client_sizes(sizes, len(ids))
    count = sample_size(len(ids), fraction_fit, min_clients)
    if count == len(ids):
        return list(ids)
    rng = np.random.default_rng([seed, server_round])
    if weights is None:
        chosen = np.sort(rng.choice(len(ids), size=count, replace=False))
    else:
        chosen = size_proportional_sample(weights, count, rng)
    return [ids[int(i)] for i in chosen]


def client_val_loader(datamodule: pl.LightningDataModule) -> DataLoader | None:
    """A client's validation batches: its datamodule's ``val_dataloader`` (the first, when it returns several), or
    ``None`` when it has none (not implemented, an empty list, or an empty data set)."""
    if not is_overridden("val_dataloader", datamodule, pl.LightningDataModule):
        return None
    loader = datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        if not loader:
            return None
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        return None
    return loader


@torch.no_grad()
def evaluate_report(
    module: pl.LightningModule, weights: Mapping[str, Tensor], dataloader: DataLoader, *, bins: int | None = None
) -> MultilabelReport:
    """Load ``weights`` into ``module`` and fill a :class:`~lightning_fedharmony.metrics.MultilabelReport` (exact, or
    binned over ``bins`` thresholds) from ``dataloader``'s ``(x, y)`` batches (or ``(x, y, observed)``: unobserved
    labels are then left out of every metric); the same evaluation wherever it runs, server or client.

    Raises:
        ValueError: if the dataloader yields no batch.
    """
    load_model_weights(module, weights)
    was_training = module.training
    module.eval()
    report: MultilabelReport | None = None
    for batch in dataloader:
        x, y = batch[0], batch[1]
        preds = torch.sigmoid(module(x.to(module.device))).float().cpu()
        if report is None:
            report = MultilabelReport(num_labels=preds.shape[1], bins=bins)
        observed = batch[2].cpu().bool() if len(batch) > 2 else None
        report.update(preds, y.cpu(), observed)
    module.train(was_training)
    if report is None:
        raise ValueError("Expected the evaluation dataloader to yield batches, but it is empty.")
    return report


def evaluate_weights(
    module: pl.LightningModule, weights: Mapping[str, Tensor], dataloader: DataLoader
) -> dict[str, float]:
    """The :func:`evaluate_report` of ``weights`` on ``dataloader`` (exact), as plain numbers."""
    return {k: float(v) for k, v in evaluate_report(module, weights, dataloader).compute().items()}


#: Prefix of the federated metrics in :attr:`RoundRecord.metrics` and of a client's own in ``client_metrics``.
FEDERATED_PREFIX, CLIENT_PREFIX = "fed_", "val_"


def merge_evaluations(
    evaluations: Sequence[Evaluation], bins: int | None = None
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Merge the clients' evaluation states exactly (``merge_state``): the federated metrics equal one pass of the
    model over the union of the clients' held-out data.

    Args:
        evaluations: the clients' validated replies (those without held-out data are skipped).
        bins: the mode the clients were asked for (``None``: exact).

    Returns:
        The federated metrics (``fed_<key>`` and ``fed_num_samples``; empty if no client had held-out data) and, per
        client with held-out data, its own (``val_<key>`` and ``val_num_samples``).
    """
    merged: MultilabelReport | None = None
    per_client: dict[str, dict[str, float]] = {}
    for evaluation in evaluations:
        if evaluation.report is None:
            continue
        num_labels = int(evaluation.report["tp"].shape[0])
        own = MultilabelReport(num_labels, bins=bins, validate_args=False)
        own.merge_state(evaluation.report)
        per_client[evaluation.client_id] = _prefixed(own.compute(), CLIENT_PREFIX, evaluation.num_samples)
        if merged is None:
            merged = MultilabelReport(num_labels, bins=bins, validate_args=False)
        merged.merge_state(own)
    if merged is None:
        return {}, per_client
    return _prefixed(merged.compute(), FEDERATED_PREFIX, int(merged.num_samples)), per_client


def _prefixed(report: Mapping[str, Tensor], prefix: str, num_samples: int) -> dict[str, float]:
    values = {f"{prefix}{k}": float(v) for k, v in report.items()}
    values[f"{prefix}num_samples"] = float(num_samples)
    return values
