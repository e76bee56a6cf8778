"""Optional clipping and Gaussian noise on the statistics a client exports (METHOD.md section 8).

What it protects: each released set of statistics is a Gaussian mechanism over the client's samples. Every sample's
prediction vector is clipped to L2 norm ``clip`` (default ``sqrt(L)``, the largest norm of a vector in
``[0, 1]^L``), so adding or removing one sample moves ``sum_preds`` by at most ``clip``, ``sum_outer`` by at most
``clip^2`` (Frobenius), the sample count by 1 and each label-count vector by at most ``sqrt(L)``; noise with standard
deviation ``noise_multiplier`` times that bound is added to each. This limits what one release says about any one
sample of the client (sample-level differential privacy with noise multiplier ``noise_multiplier`` per release).

What it does not protect: the privacy loss adds up over epochs and rounds (no accountant is included: compose the
releases with an RDP/PLD accountant of your choice); the model weights a client sends are not noised; and the
client-level picture (its label distribution as a whole) is what the statistics are meant to share, so it stays
visible up to the noise. Noise also degrades the correlations the server builds its consensus from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fedharmony.stats import CorrelationStats


def check_privacy_args(noise_multiplier: float, clip: float | None) -> None:
    """Validate ``stats_noise_multiplier`` (>= 0) and ``stats_clip`` (``None`` or > 0)."""
    if isinstance(noise_multiplier, bool) or not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise ValueError(
            f"Expected argument `stats_noise_multiplier` to be a float >= 0, but got {noise_multiplier!r}."
        )
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"Expected argument `stats_clip` to be None or a float > 0, but got {clip!r}.")


def privatize_stats(
    stats: CorrelationStats,
    noise_multiplier: float,
    clip: float | None = None,
    generator: torch.Generator | None = None,
) -> CorrelationStats:
    """A noised copy of ``stats`` (the statistics must have been accumulated with the same ``clip``).

    Args:
        stats: the client's statistics.
        noise_multiplier: standard deviation of the noise in units of each entry's sensitivity; 0 returns an exact
            copy.
        clip: the per-sample L2 bound used when accumulating (``None``: ``sqrt(L)``).
        generator: the noise's random generator (seed it for reproducible runs).

    Returns:
        New statistics, post-processed back into their valid ranges (which costs no privacy).
    """
    check_privacy_args(noise_multiplier, clip)
    out = CorrelationStats(stats.num_labels, min_label_rate=stats.min_label_rate, clip=stats.clip)
    out.load_state_dict(stats.state_dict())
    if noise_multiplier == 0:
        return out
    num_labels = stats.num_labels
    bound = math.sqrt(num_labels) if clip is None else float(clip)

    def noise(shape: tuple[int, ...], scale: float) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64) * (noise_multiplier * scale)

    n = (out.num_samples + noise((), 1.0)).clamp_min(0.0)
    outer_noise = noise((num_labels, num_labels), bound**2).triu()
    outer_noise = outer_noise + outer_noise.triu(1).T  # one draw per pair, mirrored: the result stays symmetric
    out.num_samples = n
    out.sum_preds = (out.sum_preds + noise((num_labels,), bound)).clamp(min=0.0).minimum(n)
    out.sum_outer = (out.sum_outer + outer_noise).clamp(min=0.0).minimum(n)
    for name in ("target_positives", "observed_count"):
        value = getattr(out, name) + noise((num_labels,), math.sqrt(num_labels))
        setattr(out, name, value.clamp(min=0.0).minimum(n))
    return out
