"""The FedHarmony server: leave-one-out consensus teachers, label blocks and correlation-aware aggregation.

Kou et al., "FedHarmony: Harmonizing Heterogeneous Label Correlations in Federated Multi-Label Learning",
CVPR 2026, https://arxiv.org/abs/2604.28024. The math lives in :mod:`lightning_fedharmony.functional`; this class
keeps the cross-round state (each client's latest correlation, the label blocks) and calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fedharmony.aggregators.base import (
    Aggregator,
    ClientInstructions,
    ClientUpdate,
    InconsistentClientUpdates,
    RoundAggregation,
    _check_round,
    sample_weights,
)
from lightning_fedharmony.aggregators.consensus_sums import ConsensusSums, SumsRound
from lightning_fedharmony.functional.aggregation import (
    QualityWeighting,
    aggregation_weights,
    balance_factor,
    quality_from_discrepancy,
    teacher_score,
)
from lightning_fedharmony.functional.blocks import auto_block_range, block_mask, spectral_label_blocks
from lightning_fedharmony.functional.consensus import (
    consensus_from_sums,
    consensus_sums,
    off_diagonal_abs_mean,
    teacher_and_mask,
)
from lightning_fedharmony.functional.correlation import Normalization, _check_normalization
from lightning_fedharmony.functional.losses import check_label_pull, check_reference_labels

ConsensusWeighting = Literal["samples", "uniform", "previous_aggregation"]
StaleStats = Literal["keep", "drop"]
DiscrepancyBaseline = Literal["sampling", "none"]
ProximalScaling = Literal["drift", "epochs", "none"]
ProximalRows = Literal["uniform", "labels"]
LeaveOneOut = Literal["server", "client"]
#: The paper's reading (:meth:`FedHarmony.paper`): the arguments that differ from today's defaults.
PAPER_SETTINGS: dict[str, Any] = {
    "alignment_weight": 1.0,
    "num_blocks": "eigengap",
    "quality_aggregation": True,
    "quality_weighting": "additive",
    "gamma": "auto",
    "discrepancy_baseline": "none",
    "corr_normalization": "bernoulli",
    "proximal_mu": 0.0,
    "proximal_scaling": "none",
    "proximal_rows": "uniform",
    "proximal_reference_labels": 0.0,
    "detach_marginals": False,
    "corr_momentum": 0.0,
    "leave_one_out": "server",
}
#: How many label pairs per client :meth:`FedHarmony.client_report` names.
NUM_REPORTED_PAIRS = 5


@dataclass
class _ClientRecord:
    corr: Tensor  # (L, L) float32
    valid: Tensor  # (L,) bool
    num_samples: float
    aggregation_weight: float = 0.0


def _is_number(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


def _one_of(name: str, value: Any, options: Sequence[Any]) -> None:
    if value not in options:
        raise ValueError(f"Expected argument `{name}` to be one of {tuple(options)}, but got {value!r}.")


class FedHarmony(Aggregator):
    """FedHarmony's server strategy, with a switch for each of its parts (the paper's ablations).

    Each round: the clients' statistics give their correlations ``R_k``; the weighted consensus gives every client
    a leave-one-out teacher ``R*_k`` and the global consensus gives label blocks (spectral clustering); clients are
    scored by ``q_k = exp(-gamma s_k)`` and models averaged with weights that mix data quantity and correlation
    quality. Next round each client receives its teacher and the pairs to align: in-block, supported by another
    client, and valid for itself.

    The defaults are the configuration that won on validation splits across the benchmark's data sets
    (``benchmarks/results_quality.md``): Pearson-scaled correlations with detached variances and running moments,
    ``lambda = 0.03``, models averaged by sample count (every client is still scored, and its discrepancy, sampling
    baseline and quality reported each round; ``quality_aggregation=True`` weighs by ``n_k q_k`` on the discrepancy
    beyond sampling noise), and FedProx's proximal term (``mu = 0.01``), which controls the weight drift of several
    local Adam steps that correlation alignment alone does not; with several local epochs each client holds its pull at
    its size after the first (``proximal_scaling="drift"``), and the output layer's rows are pulled by the evidence
    behind them (``proximal_rows="labels"``). :meth:`paper` gives the paper's exact reading. Where
    ``fedharmony drift`` finds strong label-correlation drift, try both: on scene with label-set Dirichlet 0.1 a
    larger ``alignment_weight`` (0.1) gained 0.2 points of validation mAP over the default and the paper's reading
    1.0 (its quality weights, which silenced clients elsewhere, made most of that).

    Args:
        alignment_weight: ``lambda`` sent to the clients with their teachers.
        alignment: send teachers (the consensus-guided loss); ``False`` is the "aggregation only" ablation.
        block_alignment: align within label blocks; ``False`` aligns all pairs (the "no blocks" ablation).
        num_blocks: number of label blocks; ``"auto"``: one block below
            :data:`~lightning_fedharmony.functional.blocks.BLOCK_KERNEL_MIN_LABELS` labels (blocks would cost time
            there), the largest eigengap within :func:`~lightning_fedharmony.functional.blocks.auto_block_range`
            above; ``"eigengap"``: the largest eigengap among the first 32 eigenvalues at any size (the paper
            preset's, which in practice picks one block).
        quality_aggregation: weight models by correlation quality; ``False`` (the default) uses sample counts. On
            validation, quality weighting never paid by more than 0.14 points of mAP and cost up to 0.67 (scene
            Dirichlet 0.1) and 0.47 (yeast k-means, 5 local epochs): in the benchmark's federations clients'
            correlations differ because their data differ, and weighting those clients down costs. On, it takes
            weight from a client whose correlations disagree beyond sampling noise (e.g. wrong labels); the
            benchmark has no such client, so whether that pays is for a validation split to say.
        quality_weighting: ``"additive"`` (the paper's) or ``"product"`` (``w_k ~ n_k q_k``: client size keeps
            counting in every round).
        gamma: quality temperature, or ``"auto"`` = ``1 / median_k s_k``.
        discrepancy_baseline: ``"sampling"`` scores ``max(0, s_k - b_k)``, the discrepancy beyond what sampling
            alone gives (:func:`~lightning_fedharmony.functional.sampling_discrepancy`), so that a client is not
            down-weighted for having few samples; ``"none"`` scores ``s_k`` (the paper's).
        t0: round at which quantity stops counting in the additive weights; ``None`` = half of the rounds.
        consensus_weighting: client weights in the consensus: ``"samples"``, ``"uniform"`` or
            ``"previous_aggregation"`` (each client's last aggregation weight).
        stale_stats: ``"keep"`` the latest statistics of every client seen so far for the consensus, or ``"drop"``
            them and use only this round's participants.
        min_label_rate: labels predicted below this rate are invalid for a client.
        corr_eps: ``eps`` of the soft phi denominator.
        corr_normalization: ``"bernoulli"`` (the paper's) or ``"pearson"``.
        proximal_mu: FedProx's ``mu`` for the clients (0 = off), for one local epoch.
        proximal_scaling: ``"drift"`` (the default) has each client hold the proximal pull at its size after the
            first local epoch of a round: local epoch ``e + 1`` trains with ``mu`` times ``min(1, d_1 / d_e)``,
            ``d_e`` being the distance from the round's global weights after ``e`` epochs
            (:func:`~lightning_fedharmony.functional.drift_proximal_scale`), so the factor can fall below 1 from the
            third epoch on and one or two local epochs train as with ``"none"``.
            ``"none"`` keeps ``proximal_mu`` for every epoch; ``"epochs"`` sends ``proximal_mu / E`` to clients that
            train ``E`` local epochs per round (told by the runner through :meth:`setup`). Measured with 5 local
            epochs (validation, 3 seeds): the best fixed ``mu`` is 0.005 on rcv1subset1, whose drift keeps growing
            over the epochs of round 1, and 0.01 on tmc2007-500, whose drift levels off. Against a fixed 0.01
            the drift rule gains 0.45 points of validation mAP on rcv1subset1 and loses 0.18 on tmc2007-500 (yeast:
            within 0.06), where ``mu / sqrt(E)`` cost tmc2007-500 1.8 points and ``mu / E`` about
            2.3 (measured at 0.003, seed 0).
        proximal_rows: ``"labels"`` (the default) pulls each row of the clients' output layer by the evidence behind
            it (:func:`~lightning_fedharmony.functional.label_proximal_scale`): a label without a positive in the
            client's round gets ``proximal_absent`` times ``mu`` (its row has only negatives to learn from and stays
            near the consensus), a label with ``n`` positives since the round began ``min(1, n / proximal_full_at)``
            times ``mu`` (a rare label's row, whose gradient is smaller than the pull, can still learn); every other
            parameter keeps ``mu``. ``"uniform"`` is FedProx's term. On validation (seed 0) it gained 1.0-3.5 points
            of mAP on corel16k001 and rcv1subset1 (feature k-means and Dirichlet 0.1), where one ``mu`` either kept
            rare labels from learning or let absent ones drift, and moved tmc2007-500 and delicious by at most 0.4
            (``benchmarks/results_quality.md``).
        proximal_full_at: positives of a label at which its output row gets the full ``mu`` (``"labels"``).
        proximal_absent: factor on ``mu`` for the output rows of labels without a positive (``"labels"``).
        proximal_reference_labels: clients whose model has ``L`` labels, fewer than this, train with ``mu`` times
            ``proximal_reference_labels / L`` (:func:`~lightning_fedharmony.functional.label_count_proximal_scale`);
            0 keeps ``mu`` for every model. The task loss averages over the labels, so the gradient it gives one
            label's row shrinks like ``1 / L``, and a fixed ``mu`` pulls a model over 6 labels far less, against that
            gradient, than one over 100. ``mu = 0.01`` was chosen for the data sets of 22 to 153 labels (on some of
            6 and 14 FedProx's 0.1 led); below 22 the factor keeps the pull's ratio to the loss gradient at its value
            for 22 labels. On validation (3 seeds) it gained 0.65 points of mAP on scene (6 labels) with label-set
            Dirichlet 0.1 and moved the other scene, emotions and yeast cells by 0.04 or less
            (``benchmarks/results_quality.md``). For modules whose loss sums over the labels instead of averaging,
            pass 0.
        align_threshold: align (and score) only the pairs whose teacher correlation has ``|R*_k| >=`` this value:
            the consensus teaches the co-occurrences it is confident about and leaves near-zero pairs, mostly
            sampling noise, to the task loss. ``0`` keeps every pair (the paper's).
        detach_marginals: sent with each teacher: the clients' batch correlation stops gradients through its
            variances (``None``: each module keeps its own setting).
        corr_momentum: sent with each teacher: the clients' running-moment momentum (``None``: the module's own).
        leave_one_out: where a client's own term leaves its teacher. ``"server"`` (the paper's reading): the server
            keeps every client's latest ``L x L`` correlation (memory ``K L^2``), builds each teacher and scores every
            client against this round's leave-one-out consensus. ``"client"``: the server keeps only the consensus
            sums (memory ``L^2`` whatever the number of clients,
            :mod:`~lightning_fedharmony.aggregators.consensus_sums`) and folds the updates in one at a time; each
            client removes its own term to get the same teacher, and scores itself against the teacher it trained
            with (so round 1, without one, weighs by data alone).
            Needs a numeric ``gamma`` and ``consensus_weighting`` ``"samples"`` or ``"uniform"``.
        seed: seed of the spectral clustering's k-means.
        server_momentum: server momentum ``beta`` in ``[0, 1)`` on the aggregated model (FedAvgM); 0, the default,
            takes the aggregate as it is. Off by default: on validation (39 cells, 3 seeds) 0.5 gained on 26 cells,
            0.69 points on average, and lost up to 1.31 on the other 13 (every tmc2007-500 cell, scene Dirichlet
            0.1, yeast with 5 local epochs; ``benchmarks/results_quality.md``).
        server_momentum_adaptive: scale the momentum kept from earlier rounds by its agreement with the round's
            update (:func:`~lightning_fedharmony.functional.server_momentum_step`).

    Example:
        >>> FedHarmony().proximal_mu, FedHarmony.paper().proximal_mu
        (0.01, 0.0)
    """

    requires_stats = True
    requires_mixin = True

    def __init__(
        self,
        alignment_weight: float = 0.03,
        *,
        alignment: bool = True,
        block_alignment: bool = True,
        num_blocks: int | str = "auto",
        quality_aggregation: bool = False,
        quality_weighting: QualityWeighting = "product",
        gamma: float | str = 3.0,
        discrepancy_baseline: DiscrepancyBaseline = "sampling",
        t0: float | None = None,
        consensus_weighting: ConsensusWeighting = "samples",
        stale_stats: StaleStats = "keep",
        min_label_rate: float = 1e-3,
        corr_eps: float = 1e-6,
        corr_normalization: Normalization = "pearson",
        proximal_mu: float = 0.01,
        proximal_scaling: ProximalScaling = "drift",
        proximal_rows: ProximalRows = "labels",
        proximal_full_at: float = 64.0,
        proximal_absent: float = 10.0,
        proximal_reference_labels: float = 22.0,
        align_threshold: float = 0.0,
        detach_marginals: bool | None = True,
        corr_momentum: float | None = 0.9,
        leave_one_out: LeaveOneOut = "server",
        seed: int = 0,
        server_momentum: float = 0.0,
        server_momentum_adaptive: bool = True,
    ) -> None:
        if not alignment_weight >= 0:
            raise ValueError(f"Expected argument `alignment_weight` to be >= 0, but got {alignment_weight!r}.")
        if not (
            num_blocks in ("auto", "eigengap")
            or (isinstance(num_blocks, int) and not isinstance(num_blocks, bool) and num_blocks >= 1)
        ):
            raise ValueError(
                f"Expected argument `num_blocks` to be 'auto', 'eigengap' or an int >= 1, but got {num_blocks!r}."
            )
        if corr_momentum is not None and not (_is_number(corr_momentum, (int, float)) and 0 <= corr_momentum < 1):
            raise ValueError(f"Expected argument `corr_momentum` to be None or in [0, 1), but got {corr_momentum!r}.")
        if detach_marginals is not None and not isinstance(detach_marginals, bool):
            raise TypeError(f"Expected argument `detach_marginals` to be None or a bool, but got {detach_marginals!r}.")
        if not (gamma == "auto" or (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma >= 0)):
            raise ValueError(f"Expected argument `gamma` to be 'auto' or a float >= 0, but got {gamma!r}.")
        if t0 is not None and not t0 > 0:
            raise ValueError(f"Expected argument `t0` to be None or > 0, but got {t0!r}.")
        if not proximal_mu >= 0:
            raise ValueError(f"Expected argument `proximal_mu` to be >= 0, but got {proximal_mu!r}.")
        if not (_is_number(min_label_rate, (int, float)) and 0 <= min_label_rate < 0.5):
            raise ValueError(f"Expected argument `min_label_rate` to be in [0, 0.5), but got {min_label_rate!r}.")
        if not (_is_number(align_threshold, (int, float)) and 0 <= align_threshold < 1):
            raise ValueError(f"Expected argument `align_threshold` to be in [0, 1), but got {align_threshold!r}.")
        if not (_is_number(corr_eps, (int, float)) and corr_eps > 0):
            raise ValueError(f"Expected argument `corr_eps` to be > 0, but got {corr_eps!r}.")
        _one_of("quality_weighting", quality_weighting, ("additive", "product"))
        _one_of("consensus_weighting", consensus_weighting, ("samples", "uniform", "previous_aggregation"))
        _one_of("stale_stats", stale_stats, ("keep", "drop"))
        _one_of("discrepancy_baseline", discrepancy_baseline, ("sampling", "none"))
        _one_of("proximal_scaling", proximal_scaling, ("drift", "epochs", "none"))
        check_label_pull(proximal_rows, proximal_full_at, proximal_absent)
        check_reference_labels(proximal_reference_labels)
        _one_of("leave_one_out", leave_one_out, ("server", "client"))
        if leave_one_out == "client" and gamma == "auto":
            raise ValueError(
                "Expected argument `gamma` to be a float with `leave_one_out='client'`, but got 'auto'."
                " HINT: 'auto' needs every client's score before any model is added; pass e.g. `gamma=3.0`."
            )
        if leave_one_out == "client" and consensus_weighting == "previous_aggregation":
            raise ValueError(
                "Expected argument `consensus_weighting` to be 'samples' or 'uniform' with `leave_one_out='client'`,"
                " but got 'previous_aggregation' (a client's weight in the sums must be known when it sends its term)."
            )
        _check_normalization(corr_normalization, "corr_normalization")
        self.set_server_momentum(server_momentum, server_momentum_adaptive)
        self.alignment_weight = float(alignment_weight)
        self.alignment = alignment
        self.block_alignment = block_alignment
        self.num_blocks = num_blocks
        self.quality_aggregation = quality_aggregation
        self.quality_weighting: QualityWeighting = quality_weighting
        self.gamma = gamma
        self.discrepancy_baseline: DiscrepancyBaseline = discrepancy_baseline
        self.t0 = t0
        self.consensus_weighting = consensus_weighting
        self.stale_stats = stale_stats
        self.min_label_rate = min_label_rate
        self.corr_eps = corr_eps
        self.corr_normalization: Normalization = corr_normalization
        self.proximal_mu = float(proximal_mu)
        self.proximal_scaling: ProximalScaling = proximal_scaling
        self.proximal_rows: ProximalRows = proximal_rows
        self.proximal_full_at = float(proximal_full_at)
        self.proximal_absent = float(proximal_absent)
        self.proximal_reference_labels = float(proximal_reference_labels)
        self.align_threshold = float(align_threshold)
        self.detach_marginals = detach_marginals
        self.corr_momentum = None if corr_momentum is None else float(corr_momentum)
        self.leave_one_out: LeaveOneOut = leave_one_out
        self.seed = seed
        self._consensus_sums = ConsensusSums()
        self._clients: dict[str, _ClientRecord] = {}
        self._sums: tuple[Tensor, Tensor] | None = None
        self._blocks = torch.zeros(0, 0, dtype=torch.bool)
        self.cluster_ids: Tensor | None = None
        self._report: tuple[dict[str, dict[str, float]], dict[str, list[tuple[int, int, float, float]]]] = ({}, {})

    @classmethod
    def paper(cls, **overrides: Any) -> FedHarmony:
        """FedHarmony as the paper reads (Kou et al., CVPR 2026), with this project's earlier choices where it is
        silent: :data:`PAPER_SETTINGS`.

        The paper's soft phi (Bernoulli-normalised, gradients through the marginals, batch moments only),
        ``lambda = 1``, its additive weights ``w_k = alpha_t n_k / sum n + (1 - alpha_t) q_k / sum q`` with
        ``gamma = 1 / median s_k`` scored on the raw discrepancy, the plain eigengap for the number of blocks, and no
        proximal term. These were this class's defaults before the validated ones.

        Args:
            overrides: any constructor argument, e.g. ``FedHarmony.paper(alignment_weight=10.0)``.

        Returns:
            A configured :class:`FedHarmony`.
        """
        return cls(**{**PAPER_SETTINGS, **overrides})

    # ------------------------------------------------------------------ server -> clients
    def client_instructions(
        self, server_round: int, client_id: str, global_weights: Mapping[str, Tensor]
    ) -> ClientInstructions:
        instructions = ClientInstructions(
            weights=dict(global_weights),
            proximal_mu=self.client_proximal_mu,
            proximal_scaling="drift" if self.proximal_scaling == "drift" else "none",
            proximal_rows=self.proximal_rows,
            proximal_full_at=self.proximal_full_at,
            proximal_absent=self.proximal_absent,
            proximal_reference_labels=self.proximal_reference_labels,
        )
        if self.leave_one_out == "client":
            instructions.consensus = self._consensus_sums.share(
                client_id,
                weighting=self.consensus_weighting,
                replace_own=self.stale_stats == "keep",
                min_label_rate=self.min_label_rate,
                align_threshold=self.align_threshold,
            )
            instructions.alignment_weight = self.alignment_weight if self.alignment else 0.0
            instructions.corr_normalization = self.corr_normalization
            instructions.corr_eps = self.corr_eps
            instructions.detach_marginals = self.detach_marginals
            instructions.corr_momentum = self.corr_momentum
        elif self.alignment and self._sums is not None:
            instructions.teacher, instructions.mask = self.teacher(client_id)
            instructions.alignment_weight = self.alignment_weight
            instructions.corr_normalization = self.corr_normalization
            instructions.corr_eps = self.corr_eps
            instructions.detach_marginals = self.detach_marginals
            instructions.corr_momentum = self.corr_momentum
        return instructions

    @property
    def relies_on_client_state(self) -> bool:  # type: ignore[override]
        """With ``leave_one_out="client"`` each client keeps its own term in the sums."""
        return self.leave_one_out == "client"

    @property
    def client_proximal_mu(self) -> float:
        """The ``mu`` sent to the clients: ``proximal_mu``, divided by the local epochs under ``"epochs"`` scaling."""
        if self.proximal_scaling == "epochs":
            return self.proximal_mu / max(self.local_epochs, 1)
        return self.proximal_mu

    def teacher(self, client_id: str) -> tuple[Tensor, Tensor]:
        """Client's leave-one-out teacher ``(L, L)`` float32 and its bool alignment mask ``(L, L)``.

        A client the server has no statistics from gets the global consensus.

        Raises:
            RuntimeError: before the first aggregation (no statistics yet), or with ``leave_one_out="client"`` (the
                server does not hold the client's own term: the client builds its teacher).
        """
        if self.leave_one_out == "client":
            raise RuntimeError(
                "Expected `leave_one_out='server'` for the server to build a client's teacher, but it is 'client':"
                " each client builds its own from the sums (`lightning_fedharmony.client_terms.share_teacher`)."
            )
        if self._sums is None or self.cluster_ids is None:
            raise RuntimeError("Expected client statistics from an earlier round, but the server has none yet.")
        record = self._clients.get(client_id)
        own = None if record is None else (record.corr, self._consensus_weight(record), record.valid)
        return teacher_and_mask(*self._sums, self._blocks, own, self.align_threshold)

    @property
    def consensus(self) -> Tensor | None:
        """The global consensus ``R*`` ``(L, L)`` of the latest round, or ``None`` before the first."""
        if self.leave_one_out == "client":
            return self._consensus_sums.consensus()
        return None if self._sums is None else consensus_from_sums(*self._sums).float()

    def begin_round(self, server_round: int, global_weights: Mapping[str, Tensor] | None = None) -> RoundAggregation:
        """With ``leave_one_out="client"`` a :class:`~lightning_fedharmony.aggregators.consensus_sums.SumsRound`,
        which folds each update in as it arrives; otherwise the updates are kept until the round ends."""
        if self.leave_one_out == "client":
            if self.quality_aggregation:
                self._t0()  # fail before any update is taken
            _check_round(server_round)
            self.check_global_weights(global_weights)
            return SumsRound(self, self._consensus_sums, server_round, global_weights)
        return super().begin_round(server_round, global_weights)

    # ------------------------------------------------------------------ clients -> server
    def client_weights(self, server_round: int, updates: Sequence[ClientUpdate]) -> tuple[Tensor, dict[str, float]]:
        for update in updates:
            if update.stats is None:
                raise InconsistentClientUpdates(
                    update.client_id,
                    "stats",
                    "FedHarmony needs each client's correlation statistics, but none were sent."
                    " HINT: train the client with the CorrelationExchange callback.",
                )
        if self._clients:
            known = next(iter(self._clients.values())).corr.shape[0]
            for update in updates:
                if update.stats is not None and update.stats.num_labels != known:
                    raise InconsistentClientUpdates(
                        update.client_id,
                        "stats.num_labels",
                        f"expected {known} labels, but got {update.stats.num_labels}.",
                    )
        if self.quality_aggregation:
            self._t0()  # fail before any state changes
        if self.stale_stats == "drop":
            self._clients = {}
        scratch = None  # one float64 buffer for every client's correlation: no per-client L x L temporaries
        for update in updates:
            stats = update.stats
            if stats is None:  # checked above; keeps type checkers informed
                continue
            if scratch is None or scratch.shape != stats.sum_outer.shape:
                scratch = torch.empty_like(stats.sum_outer)
            previous = self._clients.get(update.client_id)
            self._clients[update.client_id] = _ClientRecord(
                corr=stats.compute(eps=self.corr_eps, normalization=self.corr_normalization, out=scratch).float(),
                valid=stats.valid_labels(self.min_label_rate),
                num_samples=float(update.num_samples),
                aggregation_weight=previous.aggregation_weight if previous else 0.0,
            )
        consensus, cluster_ids = self._rebuild_consensus()

        # one client at a time: stacking every participant's teacher and mask would cost K x L^2 extra memory
        total_samples = sum(r.num_samples for r in self._clients.values())
        scored = [self._score(u.client_id, total_samples) for u in updates]
        discrepancy = torch.tensor([s[0] for s in scored], dtype=torch.float64)
        baseline = torch.tensor([s[1] for s in scored], dtype=torch.float64)
        quality = self.quality(discrepancy, baseline)
        n = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
        if self.quality_aggregation:
            weights = aggregation_weights(n, quality, server_round, self._t0(), mode=self.quality_weighting)
        else:
            weights = sample_weights(updates)
        report: dict[str, dict[str, float]] = {}
        for update, weight, score, base, q in zip(updates, weights.tolist(), discrepancy, baseline, quality):
            self._clients[update.client_id].aggregation_weight = weight
            report[update.client_id] = {
                "num_samples": float(update.num_samples),
                "discrepancy": float(score),
                "sampling_discrepancy": float(base),
                "quality": float(q),
            }
        self._report = (report, {u.client_id: s[2] for u, s in zip(updates, scored)})
        if self.consensus_weighting == "previous_aggregation":
            # the sums were built with the old aggregation weights: rebuild them with the new ones, so that teachers
            # subtract the same own term that the sums hold and a reloaded state_dict gives the same teachers
            consensus, cluster_ids = self._rebuild_consensus()
        metrics = {
            "num_blocks": float(int(cluster_ids.max()) + 1),
            "balance_factor": balance_factor(server_round, self._t0()) if self.quality_aggregation else 1.0,
            "discrepancy_mean": float(discrepancy.mean()),
            "quality_min": float(quality.min()),
            "consensus_abs_mean": float(off_diagonal_abs_mean(consensus)),
        }
        return weights, metrics

    def _score(self, client_id: str, total_samples: float) -> tuple[float, float, list[tuple[int, int, float, float]]]:
        """The client's discrepancy ``s_k``, its sampling baseline and the pairs where it departs most."""
        teacher, mask = self.teacher(client_id)
        record = self._clients[client_id]
        teacher_samples = total_samples - record.num_samples
        return teacher_score(record.corr, teacher, mask, record.num_samples, teacher_samples, NUM_REPORTED_PAIRS)

    def quality(self, discrepancy: Tensor, baseline: Tensor) -> Tensor:
        """``q_k`` from the clients' discrepancies and sampling baselines ``(K,)`` float64: ``exp(-gamma s)`` of the
        discrepancy beyond the baseline (``discrepancy_baseline="sampling"``) or of the raw one (``"none"``)."""
        if self.discrepancy_baseline == "sampling":
            return quality_from_discrepancy((discrepancy - baseline).clamp_min(0.0), self.gamma)
        return quality_from_discrepancy(discrepancy.float(), self.gamma).double()

    def client_report(self) -> tuple[dict[str, dict[str, float]], dict[str, list[tuple[int, int, float, float]]]]:
        """Per participating client of the latest round: ``num_samples``, ``discrepancy`` (``s_k``),
        ``sampling_discrepancy`` (what sampling alone would give), ``quality`` (``q_k``); and up to five label pairs
        ``(a, b, R_k, R*_k)`` where its correlation departs most from its teacher, largest gap first."""
        return self._report

    def _t0(self) -> float:
        if self.t0 is not None:
            return self.t0
        if self.num_rounds is None:
            raise RuntimeError(
                "Expected `t0` or the number of rounds to place the balance schedule, but got neither."
                " HINT: pass `FedHarmony(t0=...)` or call `setup(num_rounds)` before the first round."
            )
        return max(self.num_rounds / 2, 1.0)

    def _consensus_weight(self, record: _ClientRecord) -> float:
        if self.consensus_weighting == "samples":
            return record.num_samples
        if self.consensus_weighting == "uniform":
            return 1.0
        return record.aggregation_weight if record.aggregation_weight > 0 else 1.0 / max(len(self._clients), 1)

    def _rebuild_consensus(self) -> tuple[Tensor, Tensor]:
        records = list(self._clients.values())
        numerator, denominator = consensus_sums(
            [r.corr for r in records],
            torch.tensor([self._consensus_weight(r) for r in records], dtype=torch.float64),
            torch.stack([r.valid for r in records]),
        )
        # summed in float64, kept in float32: each client's teacher is then L^2 float32 work
        self._sums = (numerator.float(), denominator.float())
        consensus = consensus_from_sums(numerator, denominator)
        self.cluster_ids = self._label_blocks(consensus)
        self._blocks = block_mask(self.cluster_ids)
        return consensus, self.cluster_ids

    def _label_blocks(self, consensus: Tensor) -> Tensor:
        """``(L,)`` cluster ids of the labels from the consensus, by the ``num_blocks`` rule."""
        num_labels = consensus.shape[0]
        if self.block_alignment and self.num_blocks == "auto":
            low, high = auto_block_range(num_labels)
            return spectral_label_blocks(consensus, "auto", seed=self.seed, min_blocks=low, max_blocks=high)
        if self.block_alignment and self.num_blocks == "eigengap":
            return spectral_label_blocks(consensus, "auto", seed=self.seed)
        if self.block_alignment:
            return spectral_label_blocks(consensus, min(int(self.num_blocks), num_labels), seed=self.seed)
        return torch.zeros(num_labels, dtype=torch.long)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.leave_one_out == "client":
            return {
                "leave_one_out": "client",
                "num_rounds": self.num_rounds,
                **self._consensus_sums.state_dict(),
                **self.momentum_state(),
            }
        ids = list(self._clients)
        records = [self._clients[cid] for cid in ids]
        return {
            "client_ids": ids,
            "corr": torch.stack([r.corr for r in records]) if records else torch.empty(0),
            "valid": torch.stack([r.valid for r in records]) if records else torch.empty(0, dtype=torch.bool),
            "num_samples": torch.tensor([r.num_samples for r in records], dtype=torch.float64),
            "aggregation_weight": torch.tensor([r.aggregation_weight for r in records], dtype=torch.float64),
            "num_rounds": self.num_rounds,
            **self.momentum_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        kept = state.get("leave_one_out", "server")
        if kept != self.leave_one_out:
            raise ValueError(
                f"Expected a state of `leave_one_out={self.leave_one_out!r}`, but it holds one of {kept!r}."
            )
        self.num_rounds = state.get("num_rounds", self.num_rounds)
        self.load_momentum_state(state)
        if self.leave_one_out == "client":
            self._consensus_sums.load_state_dict(state)
            return
        self._clients = {
            cid: _ClientRecord(corr, valid, float(n), float(w))
            for cid, corr, valid, n, w in zip(
                state["client_ids"], state["corr"], state["valid"], state["num_samples"], state["aggregation_weight"]
            )
        }
        if self._clients:
            self._rebuild_consensus()
        else:
            self._sums, self.cluster_ids = None, None
