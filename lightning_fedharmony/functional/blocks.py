"""Label blocks: spectral clustering of the consensus correlation (Ng, Jordan and Weiss, 2001).

FedHarmony (https://arxiv.org/abs/2604.28024) aligns correlations only inside label clusters found on ``|R*|``:
in-block alignment has better curvature and loses little when the consensus is near block-diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_AUTO_BLOCKS = 32
#: From this many labels on, aligning inside blocks (gathering each block's columns) is cheaper than the dense
#: ``(L, L)`` batch correlation. Measured per alignment step, forward and backward (64 rows, 16 blocks, one thread),
#: dense vs blocks: 0.34 vs 0.55 ms at L=128, 0.48 vs 0.60 at L=200, 0.77 vs 0.68 at L=300, 1.3 vs 0.86 at L=400,
#: 11.9 vs 2.1 at L=983.
BLOCK_KERNEL_MIN_LABELS = 256
#: The widest block ``num_blocks="auto"`` aims for above the crossover: a block of S labels costs S^2 per row.
_AUTO_BLOCK_WIDTH = 128


def auto_block_range(num_labels: int) -> tuple[int, int]:
    """The ``(min, max)`` number of blocks ``num_blocks="auto"`` chooses from for ``num_labels`` labels.

    Below :data:`BLOCK_KERNEL_MIN_LABELS` blocks buy no speed (the dense kernel is faster) and, on the data sets
    measured, no accuracy, so the answer is one block: every pair is aligned. From the crossover on, at least
    ``ceil(L / 128)`` blocks (and at least 2), so that the block kernel has blocks to gather; the eigengap picks the
    number within the range.

    Example:
        >>> auto_block_range(100), auto_block_range(983)
        ((1, 1), (8, 32))
    """
    if num_labels < BLOCK_KERNEL_MIN_LABELS:
        return 1, 1
    low = max(2, -(-num_labels // _AUTO_BLOCK_WIDTH))
    return low, max(low, min(num_labels, _MAX_AUTO_BLOCKS))


def _kmeans(points: Tensor, num_clusters: int, generator: torch.Generator, num_init: int, max_iter: int) -> Tensor:
    """Batched Lloyd's k-means with k-means++ seeding; returns the assignment with the lowest inertia."""
    num_points = points.shape[0]
    best_assign = torch.zeros(num_points, dtype=torch.long)
    best_inertia = torch.tensor(float("inf"), dtype=points.dtype)
    for _ in range(num_init):
        first = int(torch.randint(num_points, (1,), generator=generator))
        centers = points[first : first + 1]
        for _ in range(1, num_clusters):
            dist = torch.cdist(points, centers).amin(1).square()
            total = dist.sum()
            probs = dist / total if total > 0 else torch.full_like(dist, 1.0 / num_points)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
            centers = torch.cat([centers, points[nxt : nxt + 1]])
        for _ in range(max_iter):
            assign = torch.cdist(points, centers).argmin(1)
            one_hot = torch.nn.functional.one_hot(assign, num_clusters).to(points.dtype)
            counts = one_hot.sum(0)
            new_centers = (one_hot.T @ points) / counts.clamp_min(1)[:, None]
            # an emptied cluster keeps its old centre instead of collapsing to the origin
            new_centers = torch.where(counts[:, None] > 0, new_centers, centers)
            if torch.equal(new_centers, centers):
                break
            centers = new_centers
        assign = torch.cdist(points, centers).argmin(1)
        inertia = (points - centers[assign]).square().sum()
        if inertia < best_inertia - 1e-12:
            best_inertia, best_assign = inertia, assign
    return best_assign


def _relabel_by_first_appearance(assign: Tensor) -> Tensor:
    """Cluster ids in order of first appearance, so the result does not depend on k-means' arbitrary numbering."""
    num_points = assign.shape[0]
    first_index = torch.full((int(assign.max()) + 1,), num_points, dtype=torch.long)
    first_index.scatter_reduce_(0, assign, torch.arange(num_points), reduce="amin")
    order = torch.argsort(first_index)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0])
    return rank[assign]


def spectral_label_blocks(
    consensus: Tensor,
    num_blocks: int | str = "auto",
    seed: int = 0,
    max_blocks: int = _MAX_AUTO_BLOCKS,
    min_blocks: int = 1,
    num_init: int = 4,
    max_iter: int = 100,
) -> Tensor:
    """Cluster labels by spectral clustering of ``|consensus|`` (Ng-Jordan-Weiss).

    The affinity ``A = |R*|`` with a zero diagonal gives the normalised Laplacian ``I - D^-1/2 A D^-1/2``; its ``G``
    eigenvectors with the smallest eigenvalues, row-normalised, are clustered with k-means.

    Args:
        consensus: ``(L, L)`` symmetric correlation.
        num_blocks: number of blocks ``G``, or ``"auto"`` for the largest eigengap among the first
            ``min(L, max_blocks)`` eigenvalues, with ``G >= min_blocks``.
        seed: seed of the k-means initialisation; the result is deterministic for a seed.
        max_blocks: upper bound of ``G`` for ``"auto"``.
        min_blocks: lower bound of ``G`` for ``"auto"`` (1: the plain eigengap rule).
        num_init: k-means restarts; the lowest inertia wins.
        max_iter: Lloyd iterations per restart.

    Returns:
        ``(L,)`` long cluster id per label in ``[0, G)``, numbered by first appearance.

    Raises:
        ValueError: on a non-square ``consensus`` or a ``num_blocks`` that is neither ``"auto"`` nor in ``[1, L]``.

    Example:
        >>> import torch
        >>> r = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.1], [0.0, 0.0, 1.0, 0.8], [0.0, 0.1, 0.8, 1.0]])
        >>> spectral_label_blocks(r)
        tensor([0, 0, 1, 1])
    """
    if consensus.ndim != 2 or consensus.shape[0] != consensus.shape[1] or consensus.shape[0] == 0:
        raise ValueError(
            f"Expected argument `consensus` to have shape (L, L) with L >= 1, but got {tuple(consensus.shape)}."
        )
    num_labels = consensus.shape[0]
    valid_int = isinstance(num_blocks, int) and not isinstance(num_blocks, bool) and 1 <= num_blocks <= num_labels
    if not (num_blocks == "auto" or valid_int):
        raise ValueError(
            f"Expected argument `num_blocks` to be 'auto' or an int in [1, {num_labels}], but got {num_blocks!r}."
        )
    if not (isinstance(max_blocks, int) and max_blocks >= 1):
        raise ValueError(f"Expected argument `max_blocks` to be a positive int, but got {max_blocks!r}.")
    if not (isinstance(min_blocks, int) and 1 <= min_blocks <= max_blocks):
        raise ValueError(
            f"Expected argument `min_blocks` to be an int in [1, max_blocks={max_blocks}], but got {min_blocks!r}."
        )
    if num_labels == 1 or num_blocks == 1 or (num_blocks == "auto" and max_blocks == 1):
        return torch.zeros(num_labels, dtype=torch.long, device=consensus.device)

    affinity = torch.nan_to_num(consensus.detach().to(torch.float64).cpu()).abs()
    affinity = 0.5 * (affinity + affinity.T)
    affinity.fill_diagonal_(0.0)
    degree = affinity.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), 0.0)
    laplacian = torch.eye(num_labels, dtype=torch.float64) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)

    if isinstance(num_blocks, int):
        groups = num_blocks
    else:
        m = min(num_labels, max_blocks)
        low = min(min_blocks, m)
        # gaps[i] separates the (i + 1) smallest eigenvalues from the rest: G = i + 1 blocks
        gaps = eigenvalues[low:m] - eigenvalues[low - 1 : m - 1]
        groups = int(torch.argmax(gaps)) + low if gaps.numel() else low
    if groups == 1:
        return torch.zeros(num_labels, dtype=torch.long, device=consensus.device)

    embedding = eigenvectors[:, :groups]
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # eigenvectors are defined up to sign; fix it so the embedding (and so k-means) is reproducible
    signs = torch.sign(embedding[embedding.abs().argmax(0), torch.arange(groups)])
    embedding = embedding * torch.where(signs == 0, 1.0, signs)
    generator = torch.Generator().manual_seed(seed)
    assign = _kmeans(embedding, groups, generator, num_init=num_init, max_iter=max_iter)
    return _relabel_by_first_appearance(assign).to(consensus.device)


def block_mask(cluster_ids: Tensor) -> Tensor:
    """``(L, L)`` bool: pairs of distinct labels in the same cluster.

    Example:
        >>> import torch
        >>> block_mask(torch.tensor([0, 0, 1])).int()
        tensor([[0, 1, 0],
                [1, 0, 0],
                [0, 0, 0]], dtype=torch.int32)
    """
    if cluster_ids.ndim != 1:
        raise ValueError(f"Expected argument `cluster_ids` to have shape (L,), but got {tuple(cluster_ids.shape)}.")
    same = cluster_ids[:, None] == cluster_ids[None, :]
    return same & ~torch.eye(cluster_ids.shape[0], dtype=torch.bool, device=cluster_ids.device)


def mask_components(mask: Tensor) -> Tensor:
    """``(L,)`` component id per label in the graph whose edges are the ``True`` pairs of ``mask`` ``(L, L)``.

    Ids are the smallest label index of each component (min-label propagation; as many sweeps as the graph's
    diameter, one for block masks).
    """
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"Expected argument `mask` to have shape (L, L), but got {tuple(mask.shape)}.")
    num_labels = mask.shape[0]
    adjacency = mask.bool() | mask.bool().T | torch.eye(num_labels, dtype=torch.bool, device=mask.device)
    component = torch.arange(num_labels, device=mask.device)
    while True:
        spread = torch.where(adjacency, component[None, :], num_labels).amin(1)
        if torch.equal(spread, component):
            return component
        component = spread


def block_layout(mask: Tensor, max_cost: float = 0.5) -> tuple[Tensor, Tensor] | None:
    """Padded label indices of the mask's connected components, for :func:`block_soft_phi`.

    Args:
        mask: ``(L, L)`` bool pairs to align.
        max_cost: give up (return ``None``) when the blocks' ``sum(G * S_max^2)`` exceeds this share of ``L^2``:
            then the dense computation is as cheap.

    Returns:
        ``(index (G, S), valid (G, S) bool)`` over the components with at least two labels, or ``None``.
    """
    component = mask_components(mask)
    ids, counts = torch.unique(component, return_counts=True)
    keep = counts >= 2
    ids, counts = ids[keep], counts[keep]
    if ids.numel() == 0:
        return None
    width = int(counts.max())
    if ids.numel() * width * width > max_cost * mask.shape[0] ** 2:
        return None
    order = torch.argsort(component, stable=True)
    index = torch.zeros(ids.numel(), width, dtype=torch.long, device=mask.device)
    valid = torch.zeros(ids.numel(), width, dtype=torch.bool, device=mask.device)
    for row, (label, count) in enumerate(zip(ids.tolist(), counts.tolist())):
        members = order[component[order] == label]
        index[row, :count] = members
        valid[row, :count] = True
    return index, valid
