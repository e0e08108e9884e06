"""Attribute transitions: the condition of each frame, from the source attributes (weight 0) to the target (1)."""

from __future__ import annotations


def frame_weights(frames: int) -> list[float]:
    """``frames`` (>= 2) evenly spaced fractions from 0 (source) to 1 (target), both ends exact."""
    return [f / (frames - 1) for f in range(frames)]


def frame_attributes(attributes: dict[str, bool], weight: float) -> dict[str, float]:
    """The condition ``weight`` of the way from the opposite of ``attributes`` to them (``weight = 1``: exactly
    ``attributes`` as 1.0/0.0)."""
    return {name: weight if wanted else 1.0 - weight for name, wanted in attributes.items()}
