"""Seeded partitioners that split a multi-label data set over federated clients.

- :func:`iid`: a uniform random split (the control every experiment needs).
- :func:`label_set_dirichlet`: label skew; samples grouped by their label set, each group spread over the clients by
  Dirichlet(alpha) proportions. Small ``alpha`` is the clean generator of label-correlation drift that FedHarmony
  (https://arxiv.org/abs/2604.28024) targets.
- :func:`feature_kmeans`: feature skew; one k-means cluster of the features per client.
- :func:`label_space_masking`: each client observes only a random subset of the labels.
- :func:`natural`: a client id per sample given by the user (real users, hospitals, ...).

Every partitioner returns a :class:`Partition`; with labels available it carries a :class:`PartitionSummary`
(client sizes, labels absent per client, the drift of each client's label phi correlation from the global one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_fedharmony.functional.correlation import soft_phi

_BASES = ("iid",)


@dataclass(frozen=True, eq=False)
class PartitionSummary:
    """Statistics of a partition of labelled data.

    Attributes:
        sizes: ``(K,)`` samples per client.
        absent_labels: per client, the labels it has no positive example of (labels it does not observe included).
        phi_drift: ``(K,)`` mean ``|phi_k - phi_global|`` over the pairs of distinct labels that are non-constant both
            in the client's data and globally (and observed by the client); ``0.0`` for a client without such a pair.
            ``phi`` is :func:`~lightning_fedharmony.functional.soft_phi` of the 0/1 label columns.
        num_valid_pairs: ``(K,)`` number of label pairs each ``phi_drift`` averages over.
        mean_phi_drift: mean of ``phi_drift`` over the clients with at least one valid pair (``0.0`` if none has).
    """

    sizes: np.ndarray
    absent_labels: list[np.ndarray]
    phi_drift: np.ndarray
    num_valid_pairs: np.ndarray
    mean_phi_drift: float

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (lists, ints, floats), for logging or json."""
        return {
            "sizes": self.sizes.tolist(),
            "absent_labels": [a.tolist() for a in self.absent_labels],
            "num_absent_labels": [int(a.size) for a in self.absent_labels],
            "phi_drift": self.phi_drift.tolist(),
            "num_valid_pairs": self.num_valid_pairs.tolist(),
            "mean_phi_drift": self.mean_phi_drift,
        }


@dataclass(frozen=True, eq=False)
class Partition:
    """Sample indices per client, the summary of the split, and the labels each client observes.

    Attributes:
        client_indices: per client, the sorted int64 indices of its samples; together a disjoint cover of the rows.
        summary: the :class:`PartitionSummary`, or ``None`` when the partitioner had no labels.
        observed: ``(K, L)`` bool, the labels each client observes (label masking only; ``None`` = all observed).
            Unobserved labels are unknown, not negative: exclude them from the loss and the statistics.
    """

    client_indices: list[np.ndarray]
    summary: PartitionSummary | None = None
    observed: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients ``K``."""
        return len(self.client_indices)

    @property
    def sizes(self) -> np.ndarray:
        """``(K,)`` samples per client."""
        return np.array([idx.size for idx in self.client_indices], dtype=np.int64)

    def with_summary(self, Y: np.ndarray) -> Partition:
        """A copy whose summary is computed on the labels ``Y`` ``(N, L)``."""
        return Partition(self.client_indices, partition_summary(Y, self.client_indices, self.observed), self.observed)


# ---------------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_num_clients(num_clients: object, num_samples: int) -> int:
    if not (_is_int(num_clients) and 1 <= int(num_clients) <= num_samples):  # type: ignore[call-overload]
        raise ValueError(
            f"Expected argument `num_clients` to be an int in [1, {num_samples}] (the number of samples), but got"
            f" {num_clients!r}."
        )
    return int(num_clients)  # type: ignore[call-overload]


def _check_positive_int(value: object, name: str) -> int:
    if not (_is_int(value) and int(value) >= 1):  # type: ignore[call-overload]
        raise ValueError(f"Expected argument `{name}` to be a positive int, but got {value!r}.")
    return int(value)  # type: ignore[call-overload]


def _check_labels(Y: object) -> np.ndarray:
    arr = np.asarray(Y)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"Expected argument `Y` to be a 0/1 array of shape (N, L), but got shape {arr.shape}.")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("Expected argument `Y` to hold only 0 and 1, but found other values.")
    return arr.astype(np.int8, copy=False)


def _check_min_samples(min_samples: object, num_clients: int, num_samples: int) -> int:
    if not (_is_int(min_samples) and int(min_samples) >= 1):  # type: ignore[call-overload]
        raise ValueError(f"Expected argument `min_samples` to be a positive int, but got {min_samples!r}.")
    if num_clients * int(min_samples) > num_samples:  # type: ignore[call-overload]
        raise ValueError(
            f"Expected `num_clients * min_samples` to be at most the {num_samples} samples, but got"
            f" {num_clients} * {min_samples}. HINT: lower `min_samples` or `num_clients`."
        )
    return int(min_samples)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------------------------------------------------


def _from_assignment(assign: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Sorted sample indices per client from a client id per sample."""
    order = np.argsort(assign, kind="stable")
    bounds = np.cumsum(np.bincount(assign, minlength=num_clients))[:-1]
    return [part.astype(np.int64) for part in np.split(order, bounds)]


def _rebalance(assign: np.ndarray, num_clients: int, min_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Give every client at least ``min_samples`` samples.

    The smallest client repeatedly takes random samples from the largest one, which keeps at least ``min_samples``.
    Moving random samples of the largest client perturbs the skew least: it is the client whose share of any group
    is best estimated. Terminates because ``num_clients * min_samples <= N`` was checked.
    """
    assign = assign.copy()
    sizes = np.bincount(assign, minlength=num_clients)
    while sizes.min() < min_samples:
        taker, donor = int(np.argmin(sizes)), int(np.argmax(sizes))
        count = min(min_samples - int(sizes[taker]), int(sizes[donor]) - min_samples)
        moved = rng.choice(np.flatnonzero(assign == donor), size=count, replace=False)
        assign[moved] = taker
        sizes[taker] += count
        sizes[donor] -= count
    return assign


def partition_summary(
    Y: np.ndarray, client_indices: Sequence[np.ndarray], observed: np.ndarray | None = None
) -> PartitionSummary:
    """Sizes, absent labels and label-correlation drift of a partition.

    Args:
        Y: ``(N, L)`` 0/1 labels.
        client_indices: per client, its row indices into ``Y``.
        observed: ``(K, L)`` bool labels each client observes, or ``None`` for all.

    Returns:
        The :class:`PartitionSummary`; the global ``phi`` is computed over the union of the clients' rows.

    Raises:
        ValueError: on labels other than 0/1 or an ``observed`` of the wrong shape.

    Example:
        >>> import numpy as np
        >>> Y = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
        >>> s = partition_summary(Y, [np.array([0, 1]), np.array([2, 3])])
        >>> s.sizes.tolist(), s.phi_drift.round(3).tolist()
        ([2, 2], [1.0, 1.0])
    """
    Y = _check_labels(Y)
    num_clients, num_labels = len(client_indices), Y.shape[1]
    if observed is not None and np.shape(observed) != (num_clients, num_labels):
        raise ValueError(
            f"Expected argument `observed` to have shape {(num_clients, num_labels)}, but got {np.shape(observed)}."
        )
    obs = np.ones((num_clients, num_labels), dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    union = np.concatenate([np.asarray(idx, dtype=np.int64) for idx in client_indices])
    # float32 is exact here: the sums of 0/1 products are integers below 2^24 for any realistic N
    labels = torch.from_numpy(Y.astype(np.float32))
    phi_global = soft_phi(labels[torch.from_numpy(union)]).numpy()
    rate_global = Y[union].mean(0)
    varies_global = (rate_global > 0) & (rate_global < 1)
    off_diagonal = ~np.eye(num_labels, dtype=bool)
    sizes = np.array([len(idx) for idx in client_indices], dtype=np.int64)
    drift = np.zeros(num_clients)
    num_pairs = np.zeros(num_clients, dtype=np.int64)
    absent: list[np.ndarray] = []
    for k, idx in enumerate(client_indices):
        rows = np.asarray(idx, dtype=np.int64)
        positives = Y[rows].sum(0) if rows.size else np.zeros(num_labels, dtype=np.int64)
        absent.append(np.flatnonzero((positives == 0) | ~obs[k]).astype(np.int64))
        # a label constant on the client (absent, always present, or a client too small) has no phi: leave it out
        valid = (positives > 0) & (positives < rows.size) & varies_global & obs[k]
        pairs = valid[:, None] & valid[None, :] & off_diagonal
        num_pairs[k] = int(pairs.sum())
        if num_pairs[k]:
            phi_k = soft_phi(labels[torch.from_numpy(rows)]).numpy()
            drift[k] = float(np.abs(phi_k - phi_global)[pairs].mean())
    has_pairs = num_pairs > 0
    mean_drift = float(drift[has_pairs].mean()) if has_pairs.any() else 0.0
    return PartitionSummary(sizes, absent, drift, num_pairs, mean_drift)


def _finish(
    assign: np.ndarray, num_clients: int, Y: np.ndarray | None, observed: np.ndarray | None = None
) -> Partition:
    indices = _from_assignment(assign, num_clients)
    summary = None if Y is None else partition_summary(Y, indices, observed)
    return Partition(indices, summary, observed)


# ---------------------------------------------------------------------------------------------------------------------
# partitioners
# ---------------------------------------------------------------------------------------------------------------------


def iid(num_samples: int, num_clients: int, seed: int = 0, *, Y: np.ndarray | None = None) -> Partition:
    """Uniform random split: client sizes differ by at most one.

    Args:
        num_samples: number of samples ``N``.
        num_clients: number of clients ``K`` in ``[1, N]``.
        seed: seed of the numpy generator.
        Y: ``(N, L)`` 0/1 labels; when given, the summary is computed.

    Returns:
        The partition.

    Raises:
        ValueError: on a bad ``num_samples`` or ``num_clients``.

    Example:
        >>> [idx.tolist() for idx in iid(5, 2, seed=0).client_indices]
        [[2, 3, 4], [0, 1]]
    """
    if not (_is_int(num_samples) and num_samples >= 1):
        raise ValueError(f"Expected argument `num_samples` to be a positive int, but got {num_samples!r}.")
    num_clients = _check_num_clients(num_clients, int(num_samples))
    if Y is not None and np.shape(Y)[0] != num_samples:
        raise ValueError(f"Expected argument `Y` to have {num_samples} rows, but got shape {np.shape(Y)}.")
    perm = np.random.default_rng(seed).permutation(int(num_samples))
    assign = np.empty(int(num_samples), dtype=np.int64)
    for k, part in enumerate(np.array_split(perm, num_clients)):
        assign[part] = k
    return _finish(assign, num_clients, Y)


def natural(client_ids: np.ndarray | Sequence[Any], *, Y: np.ndarray | None = None) -> Partition:
    """One client per distinct id: the user's own split (real users, sites, ...).

    Args:
        client_ids: ``(N,)`` a client id per sample (ints or strings). Client ``k`` is the ``k``-th smallest id
            (``np.unique`` order).
        Y: ``(N, L)`` 0/1 labels; when given, the summary is computed.

    Returns:
        The partition.

    Raises:
        ValueError: if ``client_ids`` is not a non-empty 1-D array.

    Example:
        >>> [idx.tolist() for idx in natural(["b", "a", "b"]).client_indices]
        [[1], [0, 2]]
    """
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"Expected argument `client_ids` to be a non-empty 1-D array, but got shape {ids.shape}.")
    if Y is not None and np.shape(Y)[0] != ids.size:
        raise ValueError(f"Expected argument `Y` to have {ids.size} rows, but got shape {np.shape(Y)}.")
    _, assign = np.unique(ids, return_inverse=True)
    assign = assign.reshape(-1).astype(np.int64)
    return _finish(assign, int(assign.max()) + 1, Y)


def _label_set_groups(Y: np.ndarray, max_groups: int) -> np.ndarray:
    """Group id per sample: its exact label set if that set is among the ``max_groups`` most frequent ones, else the
    frequent set nearest in Hamming distance (ties to the more frequent set)."""
    packed = np.packbits(Y.astype(np.uint8), axis=1)
    _, first, inverse, counts = np.unique(packed, axis=0, return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    # most frequent first; equal counts by first appearance, so the grouping does not depend on byte order
    order = np.lexsort((first, -counts))
    kept = order[:max_groups]
    set_to_group = np.full(counts.size, -1, dtype=np.int64)
    set_to_group[kept] = np.arange(kept.size)
    rare = order[max_groups:]
    if rare.size:
        sets = Y[first].astype(np.float32)
        frequent = sets[kept]
        rare_sets = sets[rare]
        # Hamming distance |a - b| = a.(1 - b) + (1 - a).b for 0/1 vectors, as two matrix products
        dist = rare_sets @ (1 - frequent).T + (1 - rare_sets) @ frequent.T
        set_to_group[rare] = np.argmin(dist, axis=1)
    return set_to_group[inverse]


def label_set_dirichlet(
    Y: np.ndarray,
    num_clients: int,
    alpha: float = 0.1,
    seed: int = 0,
    *,
    min_samples: int = 10,
    max_groups: int = 64,
) -> Partition:
    """Label-skew split: samples grouped by label set, each group spread over clients by Dirichlet(alpha).

    Steps: (1) group the samples by their exact label vector; the ``max_groups`` most frequent label sets are the
    groups and every rarer set joins the frequent set nearest in Hamming distance (without the cap, data sets with
    thousands of distinct sets, e.g. delicious, would have one sample per group and the split would be near IID);
    (2) for each group draw ``p ~ Dirichlet(alpha * 1_K)`` and deal the group's shuffled samples out with
    multinomial counts; (3) rebalance: while a client has fewer than ``min_samples`` samples it takes random samples
    from the largest client (which keeps at least ``min_samples``).

    Args:
        Y: ``(N, L)`` 0/1 labels.
        num_clients: number of clients ``K`` in ``[1, N]``.
        alpha: Dirichlet concentration, ``> 0``; small is skewed (0.1 is the method's drift setting), large is
            near IID.
        seed: seed of the numpy generator.
        min_samples: the fewest samples a client may get, ``>= 1`` with ``K * min_samples <= N``.
        max_groups: the most label-set groups, ``>= 1``.

    Returns:
        The partition with its summary.

    Raises:
        ValueError: on a bad argument.

    Example:
        >>> import numpy as np
        >>> Y = np.random.default_rng(0).integers(0, 2, size=(100, 3))
        >>> p = label_set_dirichlet(Y, 4, alpha=0.5, seed=0, min_samples=5)
        >>> int(p.sizes.sum()), bool(p.sizes.min() >= 5)
        (100, True)
    """
    labels = _check_labels(Y)
    num_samples = labels.shape[0]
    num_clients = _check_num_clients(num_clients, num_samples)
    if not (_is_real(alpha) and alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"Expected argument `alpha` to be a positive float, but got {alpha!r}.")
    min_samples = _check_min_samples(min_samples, num_clients, num_samples)
    max_groups = _check_positive_int(max_groups, "max_groups")
    rng = np.random.default_rng(seed)
    groups = _label_set_groups(labels, max_groups)
    order = np.argsort(groups, kind="stable")
    group_sizes = np.bincount(groups)
    assign = np.empty(num_samples, dtype=np.int64)
    for members in np.split(order, np.cumsum(group_sizes)[:-1]):
        if members.size == 0:
            continue
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.isfinite(proportions).all() or proportions.sum() <= 0:
            # tiny alpha can underflow every gamma draw; the Dirichlet's limit is all mass on one client
            proportions = np.eye(num_clients)[rng.integers(num_clients)]
        counts = rng.multinomial(members.size, proportions / proportions.sum())
        assign[rng.permutation(members)] = np.repeat(np.arange(num_clients), counts)
    assign = _rebalance(assign, num_clients, min_samples, rng)
    return _finish(assign, num_clients, labels)


def _kmeans(
    points: torch.Tensor, num_clusters: int, generator: torch.Generator, num_init: int, max_iter: int
) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding for many points: returns the assignment with the lowest inertia.

    Distances come from one matrix product per iteration (``|x|^2 - 2 x.c + |c|^2``), which is ~100x faster than
    ``torch.cdist`` at N ~ 30,000, D = 500 (the label-block k-means in ``functional.blocks`` clusters only L points).
    """
    num_points = points.shape[0]
    sq_norms = points.square().sum(1)
    best_assign, best_inertia = torch.zeros(num_points, dtype=torch.long), float("inf")
    for _ in range(num_init):
        first = int(torch.randint(num_points, (1,), generator=generator))
        centers = points[first : first + 1]
        nearest = (sq_norms - 2 * points @ centers[0] + sq_norms[first]).clamp_min(0)
        for _ in range(1, num_clusters):
            total = float(nearest.sum())
            if total > 0:
                nxt = int(torch.multinomial(nearest / total, 1, generator=generator))
            else:
                nxt = int(torch.randint(num_points, (1,), generator=generator))
            centers = torch.cat([centers, points[nxt : nxt + 1]])
            nearest = torch.minimum(nearest, (sq_norms - 2 * points @ points[nxt] + sq_norms[nxt]).clamp_min(0))
        assign = torch.full((num_points,), -1, dtype=torch.long)
        for _ in range(max_iter):
            dist = centers.square().sum(1)[None, :] - 2 * points @ centers.T
            new_assign = dist.argmin(1)
            if torch.equal(new_assign, assign):
                break
            assign = new_assign
            counts = torch.bincount(assign, minlength=num_clusters).to(points.dtype)
            sums = torch.zeros_like(centers).index_add_(0, assign, points)
            # an emptied cluster keeps its centre; the rebalancing step gives it samples
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        inertia = float((sq_norms + dist.min(1).values).sum())
        if inertia < best_inertia:
            best_inertia, best_assign = inertia, assign
    return best_assign.numpy().astype(np.int64)


def feature_kmeans(
    X: np.ndarray,
    num_clients: int,
    seed: int = 0,
    *,
    standardize: bool = True,
    min_samples: int = 10,
    num_init: int = 1,
    max_iter: int = 100,
    Y: np.ndarray | None = None,
) -> Partition:
    """Feature-skew split: k-means on the features, one cluster per client.

    Lloyd's k-means with k-means++ seeding in torch (no sklearn). Client sizes follow the clusters and can be very
    unequal (on tmc2007-500 up to ~1000x); a client below ``min_samples`` (e.g. an empty cluster) takes random samples
    from the largest client, as in :func:`label_set_dirichlet`.

    Args:
        X: ``(N, D)`` features.
        num_clients: number of clients ``K`` in ``[1, N]``.
        seed: seed of the k-means++ seeding and the rebalancing.
        standardize: z-score the features first, so that no feature dominates by its scale.
        min_samples: the fewest samples a client may get, ``>= 1`` with ``K * min_samples <= N``.
        num_init: k-means restarts, the lowest inertia wins.
        max_iter: Lloyd iterations per restart.
        Y: ``(N, L)`` 0/1 labels; when given, the summary is computed.

    Returns:
        The partition.

    Raises:
        ValueError: on a bad argument.

    Example:
        >>> import numpy as np
        >>> X = np.array([[0.0], [0.1], [5.0], [5.1], [5.2]])
        >>> sorted(idx.tolist() for idx in feature_kmeans(X, 2, seed=0, min_samples=1).client_indices)
        [[0, 1], [2, 3, 4]]
    """
    features = np.asarray(X)
    if features.ndim != 2 or features.shape[0] < 1 or not np.issubdtype(features.dtype, np.number):
        raise ValueError(
            f"Expected argument `X` to be a numeric array of shape (N, D), but got shape {features.shape}."
        )
    if not np.isfinite(features).all():
        raise ValueError("Expected argument `X` to hold only finite values, but found NaN or inf.")
    num_samples = features.shape[0]
    num_clients = _check_num_clients(num_clients, num_samples)
    min_samples = _check_min_samples(min_samples, num_clients, num_samples)
    num_init = _check_positive_int(num_init, "num_init")
    max_iter = _check_positive_int(max_iter, "max_iter")
    if Y is not None and np.shape(Y)[0] != num_samples:
        raise ValueError(f"Expected argument `Y` to have {num_samples} rows, but got shape {np.shape(Y)}.")
    points = features.astype(np.float64)
    if standardize:
        std = points.std(0)
        points = (points - points.mean(0)) / np.where(std > 0, std, 1.0)
    if num_clients == 1:
        assign = np.zeros(num_samples, dtype=np.int64)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        tensor = torch.from_numpy(points.astype(np.float32))
        assign = _kmeans(tensor, num_clients, generator, num_init=num_init, max_iter=max_iter)
    assign = _rebalance(assign, num_clients, min_samples, np.random.default_rng(seed))
    return _finish(assign, num_clients, Y)


def _check_fraction(observed_fraction: object) -> tuple[float, float]:
    value = observed_fraction
    if _is_real(value):
        value = (value, value)
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_real(v) for v in value)
        and 0 < value[0] <= value[1] <= 1
    )
    if not ok:
        raise ValueError(
            "Expected argument `observed_fraction` to be a float or a pair (low, high) with 0 < low <= high <= 1, but"
            f" got {observed_fraction!r}."
        )
    return float(value[0]), float(value[1])  # type: ignore[index]


def label_space_masking(
    Y: np.ndarray,
    num_clients: int,
    observed_fraction: float | tuple[float, float] = (0.5, 0.7),
    seed: int = 0,
    base: str | Partition = "iid",
) -> Partition:
    """Label-space split: each client observes only a random subset of the labels.

    Client ``k`` draws a fraction ``f_k ~ U(low, high)`` and observes ``m_k = round(f_k L)`` random labels (kept in
    ``[ceil(low L), floor(high L)]`` when that range holds an integer, so ``m_k / L`` lies in the range). Every label
    is then made observed by some client: an unobserved label replaces, in a random client, a label that another
    client also observes (the counts ``m_k`` do not change). The samples come from ``base``.

    Unobserved labels are unknown, not negative: downstream code must drop them from the loss and the statistics
    (the :class:`~lightning_fedharmony.data.ClientDataModule` yields the mask with every batch).

    Args:
        Y: ``(N, L)`` 0/1 labels.
        num_clients: number of clients ``K`` in ``[1, N]``.
        observed_fraction: ``(low, high)`` with ``0 < low <= high <= 1``, or one float for both.
        seed: seed of the numpy generator (and of the ``"iid"`` base split).
        base: ``"iid"`` for a uniform random split of the samples, or a :class:`Partition` without a mask (e.g.
            from :func:`label_set_dirichlet`) to combine label masking with another skew.

    Returns:
        The partition with ``observed`` ``(K, L)`` and its summary (drift over observed labels only).

    Raises:
        ValueError: on a bad argument, or when ``K`` clients observing at most ``floor(high L)`` labels each cannot
            cover all ``L`` labels.

    Example:
        >>> import numpy as np
        >>> Y = np.random.default_rng(0).integers(0, 2, size=(50, 10))
        >>> p = label_space_masking(Y, 3, observed_fraction=(0.4, 0.6), seed=0)
        >>> p.observed.shape, bool(p.observed.any(0).all())
        ((3, 10), True)
    """
    labels = _check_labels(Y)
    num_samples, num_labels = labels.shape
    num_clients = _check_num_clients(num_clients, num_samples)
    low, high = _check_fraction(observed_fraction)
    m_low = max(1, int(np.ceil(low * num_labels - 1e-9)))
    m_high = int(np.floor(high * num_labels + 1e-9))
    if m_high < m_low:
        # the range holds no multiple of 1/L: take the nearest count
        m_low = m_high = min(max(1, round(0.5 * (low + high) * num_labels)), num_labels)
    if num_clients * m_high < num_labels:
        raise ValueError(
            f"Expected `num_clients * observed_fraction[1]` to cover all {num_labels} labels, but {num_clients} clients"
            f" observe at most {m_high} labels each. HINT: raise the upper fraction or the number of clients."
        )
    if isinstance(base, Partition):
        if base.num_clients != num_clients:
            raise ValueError(
                f"Expected argument `base` to have {num_clients} clients (`num_clients`), but it has"
                f" {base.num_clients}."
            )
        if base.observed is not None:
            raise ValueError("Expected argument `base` to be a partition without a label mask, but it has one.")
        indices = [np.asarray(idx, dtype=np.int64) for idx in base.client_indices]
    elif base in _BASES:
        indices = iid(num_samples, num_clients, seed).client_indices
    else:
        raise ValueError(f"Expected argument `base` to be one of {_BASES} or a `Partition`, but got {base!r}.")
    rng = np.random.default_rng((int(seed), 1))
    counts = np.clip(np.round(rng.uniform(low, high, size=num_clients) * num_labels), m_low, m_high).astype(np.int64)
    # the drawn counts may fall short of L; top up below the cap (in client order) so that all labels fit
    for k in range(num_clients):
        if counts.sum() >= num_labels:
            break
        counts[k] += min(m_high - counts[k], num_labels - counts.sum())
    observed = np.zeros((num_clients, num_labels), dtype=bool)
    for k in range(num_clients):
        observed[k, rng.permutation(num_labels)[: counts[k]]] = True
    coverage = observed.sum(0)
    for label in rng.permutation(np.flatnonzero(coverage == 0)):
        # sum(counts) >= L, so while a label is uncovered another is covered twice (pigeonhole)
        spare = rng.choice(np.flatnonzero(coverage >= 2))
        client = rng.choice(np.flatnonzero(observed[:, spare]))
        observed[client, spare], observed[client, label] = False, True
        coverage[spare] -= 1
        coverage[label] += 1
    summary = partition_summary(labels, indices, observed)
    return Partition(indices, summary, observed)
