"""Plain numpy reference implementations of the math in ``lightning_fedharmony.functional``.

Written straight from the formulas of METHOD.md (sections 1-5), with explicit Python loops wherever that makes the
result obviously right. They are slow on purpose and used only by the tests, on tiny inputs, in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


def soft_phi_ref(preds: ArrayLike, eps: float = 1e-6, normalization: str = "bernoulli") -> Array:
    """METHOD.md section 1, one label pair at a time.

    ``p_c = mean_n F_nc``, ``p_cc' = mean_n F_nc F_nc'``,
    ``R_cc' = (p_cc' - p_c p_c') / (sqrt(v_c v_c') + eps)``, diagonal 1, where ``v_c = p_c (1 - p_c)`` ("bernoulli")
    or ``v_c = p_cc - p_c^2`` ("pearson"). No samples: the identity.
    """
    f = np.asarray(preds, dtype=np.float64)
    num_samples, num_labels = f.shape
    out = np.eye(num_labels)
    if num_samples == 0:
        return out
    p = [sum(f[n, c] for n in range(num_samples)) / num_samples for c in range(num_labels)]

    def second_moment(c: int, d: int) -> float:
        return sum(f[n, c] * f[n, d] for n in range(num_samples)) / num_samples

    def variance(c: int) -> float:
        v = p[c] * (1.0 - p[c]) if normalization == "bernoulli" else second_moment(c, c) - p[c] ** 2
        return max(v, 0.0)

    for c in range(num_labels):
        for d in range(num_labels):
            if c == d:
                continue
            cov = second_moment(c, d) - p[c] * p[d]
            r = cov / (np.sqrt(variance(c) * variance(d)) + eps)
            out[c, d] = min(1.0, max(-1.0, r))
    return out


def pair_validity_ref(valid: ArrayLike) -> NDArray[np.bool_]:
    """``(K, L)`` -> ``(K, L, L)``: both labels of the pair valid for the client."""
    v = np.asarray(valid, dtype=bool)
    num_clients, num_labels = v.shape
    out = np.zeros((num_clients, num_labels, num_labels), dtype=bool)
    for k in range(num_clients):
        for c in range(num_labels):
            for d in range(num_labels):
                out[k, c, d] = bool(v[k, c] and v[k, d])
    return out


def _validity_or_all(valid: ArrayLike | None, num_clients: int, num_labels: int) -> NDArray[np.bool_]:
    if valid is None:
        return np.ones((num_clients, num_labels), dtype=bool)
    return np.asarray(valid, dtype=bool)


def consensus_over_ref(
    correlations: ArrayLike, weights: ArrayLike, valid: ArrayLike | None, clients: Sequence[int]
) -> Array:
    """METHOD.md section 2: ``sum_j w_j V_j R_j / sum_j w_j V_j`` over ``clients``; no support -> 0, diagonal 1."""
    r = np.asarray(correlations, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    num_clients, num_labels = r.shape[:2]
    v = _validity_or_all(valid, num_clients, num_labels)
    out = np.eye(num_labels)
    for c in range(num_labels):
        for d in range(num_labels):
            if c == d:
                continue
            numerator = 0.0
            denominator = 0.0
            for j in clients:
                if v[j, c] and v[j, d]:
                    numerator += w[j] * r[j, c, d]
                    denominator += w[j]
            out[c, d] = numerator / denominator if denominator > 0 else 0.0
    return out


def consensus_sums_ref(correlations: ArrayLike, weights: ArrayLike, valid: ArrayLike | None) -> tuple[Array, Array]:
    """``(sum_j w_j V_j R_j, sum_j w_j V_j)`` including the diagonal."""
    r = np.asarray(correlations, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    num_clients, num_labels = r.shape[:2]
    v = _validity_or_all(valid, num_clients, num_labels)
    numerator = np.zeros((num_labels, num_labels))
    denominator = np.zeros((num_labels, num_labels))
    for j in range(num_clients):
        for c in range(num_labels):
            for d in range(num_labels):
                if v[j, c] and v[j, d]:
                    numerator[c, d] += w[j] * r[j, c, d]
                    denominator[c, d] += w[j]
    return numerator, denominator


def global_consensus_ref(correlations: ArrayLike, weights: ArrayLike, valid: ArrayLike | None = None) -> Array:
    """The consensus over all clients."""
    num_clients = np.asarray(correlations).shape[0]
    return consensus_over_ref(correlations, weights, valid, range(num_clients))


def leave_one_out_consensus_ref(correlations: ArrayLike, weights: ArrayLike, valid: ArrayLike | None = None) -> Array:
    """``R*_k`` from every client but ``k``: ``(K, L, L)``."""
    num_clients = np.asarray(correlations).shape[0]
    return np.stack(
        [
            consensus_over_ref(correlations, weights, valid, [j for j in range(num_clients) if j != k])
            for k in range(num_clients)
        ]
    )


def leave_one_out_support_ref(weights: ArrayLike, valid: ArrayLike | None, num_labels: int) -> NDArray[np.bool_]:
    """``(K, L, L)``: some other client with positive weight supports both labels of the pair."""
    w = np.asarray(weights, dtype=np.float64)
    num_clients = w.shape[0]
    v = _validity_or_all(valid, num_clients, num_labels)
    out = np.zeros((num_clients, num_labels, num_labels), dtype=bool)
    for k in range(num_clients):
        for c in range(num_labels):
            for d in range(num_labels):
                out[k, c, d] = any(w[j] > 0 and v[j, c] and v[j, d] for j in range(num_clients) if j != k)
    return out


def normalized_laplacian_ref(consensus: ArrayLike) -> Array:
    """METHOD.md section 3: ``I - D^-1/2 A D^-1/2`` with ``A = |R*|`` symmetrised, zero diagonal.

    An isolated label (degree 0) gets ``D^-1/2 = 0``.
    """
    a = np.abs(np.asarray(consensus, dtype=np.float64))
    a = 0.5 * (a + a.T)
    np.fill_diagonal(a, 0.0)
    num_labels = a.shape[0]
    degree = a.sum(axis=1)
    inv_sqrt = np.array([1.0 / np.sqrt(d) if d > 0 else 0.0 for d in degree])
    out = np.eye(num_labels)
    for c in range(num_labels):
        for d in range(num_labels):
            out[c, d] -= inv_sqrt[c] * a[c, d] * inv_sqrt[d]
    return out


def eigengap_num_blocks_ref(consensus: ArrayLike, max_blocks: int = 32) -> tuple[int, float]:
    """``(G, margin)``: largest gap among the first ``min(L, max_blocks)`` eigenvalues of the normalised Laplacian.

    ``margin`` is the distance between the largest and the second largest gap (inf when there is one gap), so a
    test can avoid near ties, where round-off decides.
    """
    eigenvalues = np.linalg.eigvalsh(normalized_laplacian_ref(consensus))
    m = min(len(eigenvalues), max_blocks)
    gaps = [eigenvalues[i + 1] - eigenvalues[i] for i in range(m - 1)]
    if not gaps:
        return 1, float("inf")
    best = int(np.argmax(gaps))
    ordered = sorted(gaps, reverse=True)
    margin = ordered[0] - ordered[1] if len(ordered) > 1 else float("inf")
    return best + 1, float(margin)


def first_appearance_ref(ids: ArrayLike) -> NDArray[np.int64]:
    """Renumber cluster ids in order of first appearance: a canonical form of a partition."""
    seen: dict[int, int] = {}
    out = []
    for i in np.asarray(ids).tolist():
        if i not in seen:
            seen[i] = len(seen)
        out.append(seen[i])
    return np.asarray(out, dtype=np.int64)


def block_mask_ref(ids: ArrayLike) -> NDArray[np.bool_]:
    """Pairs ``(c, c')``, ``c != c'``, in the same cluster."""
    i = np.asarray(ids).tolist()
    num_labels = len(i)
    out = np.zeros((num_labels, num_labels), dtype=bool)
    for c in range(num_labels):
        for d in range(num_labels):
            out[c, d] = c != d and i[c] == i[d]
    return out


def alignment_loss_ref(corr: ArrayLike, teacher: ArrayLike, mask: ArrayLike) -> float:
    """METHOD.md section 4: ``sum_{(c,c') in M} (R_cc' - R*_cc')^2 / |M|``; 0 for an empty mask."""
    r = np.asarray(corr, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    total = 0.0
    count = 0
    for c in range(r.shape[0]):
        for d in range(r.shape[1]):
            if m[c, d]:
                total += (r[c, d] - t[c, d]) ** 2
                count += 1
    return total / count if count else 0.0


def proximal_term_ref(params: Sequence[ArrayLike], global_params: Sequence[ArrayLike], mu: float) -> float:
    """FedProx: ``mu / 2 * sum ||w - w_global||^2``."""
    total = 0.0
    for p, g in zip(params, global_params):
        diff = np.asarray(p, dtype=np.float64).ravel() - np.asarray(g, dtype=np.float64).ravel()
        total += sum(float(x) ** 2 for x in diff)
    return 0.5 * mu * total


def correlation_discrepancy_ref(corr: ArrayLike, teacher: ArrayLike, mask: ArrayLike) -> Array:
    """METHOD.md section 5: ``s_k`` = mean over the masked pairs of ``(R_k - R*_k)^2``; 0 with no masked pair."""
    r = np.asarray(corr, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), r.shape)
    return np.array([alignment_loss_ref(r[k], t[k], m[k]) for k in range(r.shape[0])])


def quality_from_discrepancy_ref(discrepancy: ArrayLike, gamma: float | str = "auto") -> Array:
    """``q_k = exp(-gamma s_k)``; ``"auto"``: ``gamma = 1 / median_k s_k``, all ones when the median is 0."""
    s = np.asarray(discrepancy, dtype=np.float64)
    if gamma == "auto":
        median = float(np.median(s)) if s.size else 0.0
        if median <= 0:
            return np.ones_like(s)
        gamma = 1.0 / median
    return np.array([np.exp(-float(gamma) * x) for x in s])


def balance_factor_ref(server_round: int, t0: float) -> float:
    """``alpha_t = max(0, 1 - t / T0)``; ``T0 <= 0``: quality only."""
    if t0 <= 0:
        return 0.0
    return max(0.0, 1.0 - server_round / t0)


def _share(x: Array) -> Array:
    total = float(sum(x))
    if total <= 0:
        return np.full(len(x), 1.0 / len(x))
    return np.array([v / total for v in x])


def aggregation_weights_ref(
    num_samples: ArrayLike, quality: ArrayLike, server_round: int, t0: float, mode: str = "additive"
) -> Array:
    """``additive``: ``alpha_t n_k / sum n + (1 - alpha_t) q_k / sum q``; ``product``: ``n_k q_k / sum n q``."""
    n = np.asarray(num_samples, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if mode == "product":
        return _share(n * q)
    alpha = balance_factor_ref(server_round, t0)
    return alpha * _share(n) + (1.0 - alpha) * _share(q)


def weighted_average_ref(state_dicts: Sequence[Mapping[str, ArrayLike]], weights: ArrayLike) -> dict[str, Array]:
    """``np.average(..., weights=...)`` per floating key; other entries from the client with the largest weight."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    top = int(np.argmax(w))
    out: dict[str, Array] = {}
    for key in state_dicts[0]:
        values = [np.asarray(state[key]) for state in state_dicts]
        if np.issubdtype(values[0].dtype, np.floating):
            out[key] = np.average(np.stack([v.astype(np.float64) for v in values]), axis=0, weights=w)
        else:
            out[key] = values[top]
    return out
