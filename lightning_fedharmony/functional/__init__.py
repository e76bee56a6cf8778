"""Pure-tensor math of FedHarmony: no state, no I/O."""

from lightning_fedharmony.functional.aggregation import (
    aggregation_weights,
    balance_factor,
    correlation_discrepancy,
    correlation_quality,
    departing_pairs,
    quality_from_discrepancy,
    sampling_discrepancy,
    teacher_score,
    weighted_average,
)
from lightning_fedharmony.functional.blocks import (
    auto_block_range,
    block_layout,
    block_mask,
    mask_components,
    spectral_label_blocks,
)
from lightning_fedharmony.functional.consensus import (
    consensus_from_sums,
    consensus_sums,
    global_consensus,
    leave_one_out_consensus,
    leave_one_out_sums,
    leave_one_out_support,
    leave_one_out_teacher,
    off_diagonal_abs_mean,
    pair_validity,
    teacher_and_mask,
)
from lightning_fedharmony.functional.correlation import block_soft_phi, phi_from_means, phi_from_moments, soft_phi
from lightning_fedharmony.functional.losses import alignment_loss, proximal_term, soft_phi_alignment_loss

__all__ = [
    "aggregation_weights",
    "alignment_loss",
    "auto_block_range",
    "balance_factor",
    "block_layout",
    "block_mask",
    "block_soft_phi",
    "consensus_from_sums",
    "consensus_sums",
    "correlation_discrepancy",
    "correlation_quality",
    "departing_pairs",
    "global_consensus",
    "leave_one_out_consensus",
    "leave_one_out_sums",
    "leave_one_out_support",
    "leave_one_out_teacher",
    "mask_components",
    "off_diagonal_abs_mean",
    "pair_validity",
    "phi_from_means",
    "phi_from_moments",
    "proximal_term",
    "quality_from_discrepancy",
    "sampling_discrepancy",
    "soft_phi",
    "soft_phi_alignment_loss",
    "spectral_label_blocks",
    "teacher_and_mask",
    "teacher_score",
    "weighted_average",
]
