"""Pictures of edits: each as input | edit | where they differ, and the model card's best and worst cases by the edit
instruments (:meth:`~training.evaluation.edit_realism.EditInstruments.face_scores`)."""

from __future__ import annotations

import torch

DIFFERENCE_GAIN = 4  # a difference of 1/4 of the range shows white
CASES = 4  # edits per group in the best and worst cases (:func:`case_rows`)


def edit_rows(inputs: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` inputs and their edits -> ``uint8 [3 N, 3, S, S]``: input, edit and their difference
    map per face, for a grid of three columns."""
    difference = (edits.float() - inputs.float()).abs().mean(dim=1, keepdim=True) * DIFFERENCE_GAIN
    difference = difference.clamp(max=255).to(torch.uint8).expand(-1, 3, -1, -1)
    return torch.stack([inputs, edits, difference], dim=1).flatten(0, 1)


def case_rows(sources: torch.Tensor, edits: torch.Tensor, scores: dict[str, torch.Tensor], per_group: int = CASES
              ) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """The model card's best and worst edits: ``per_group`` with the most foreign mouth colours, ``per_group`` that
    lose the most identity parameters (the colour score breaking ties) and the ``per_group`` best (fewest parameters
    lost, then the lowest colour score), each as input | edit | difference (``uint8 [3 k, 3, S, S]``, k = the rows
    shown), with the indices of each group."""
    colour = scores["colour"]
    badness = scores["lost"].float() * (colour.max() + 1) + colour  # the colour score orders within a count lost
    groups = {"colour": colour.argsort(descending=True, stable=True)[:per_group].tolist(),
              "identity": badness.argsort(descending=True, stable=True)[:per_group].tolist(),
              "best": badness.argsort(stable=True)[:per_group].tolist()}
    order = [index for group in groups.values() for index in group]
    return edit_rows(sources[order], edits[order]), groups
