"""Per-image uncertainty: the functions live in :mod:`diffmic.diffusion.uncertainty` (re-exported)."""

from __future__ import annotations

from diffmic.diffusion.uncertainty import class_intervals, predictive_entropy, vote_fractions

__all__ = ["class_intervals", "predictive_entropy", "vote_fractions"]
