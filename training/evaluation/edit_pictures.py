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
    """The model card's best and worst edits, from per-edit ``scores``: ``colour float [N]`` (the mouth's colour
    score, above 1 outside real mouths' colours), ``lost int [N]`` (identity parameters not kept) and ``read bool
    [N]`` (the judge reads the target). Groups of ``per_group``: the most foreign mouth colours; the most parameters
    lost (the colour score breaking ties); the best, among the edits read as the target (then the others), with the
    fewest parameters lost, then the lowest colour score. Returns each shown edit as input | edit | difference
    (``uint8 [3 k, 3, S, S]``, k = the rows shown) and the indices of each group."""
    colour, lost, missed = scores["colour"], scores["lost"], (~scores["read"]).long()

    def ordered(keys: list[torch.Tensor], descending: bool) -> torch.Tensor:
        """Indices sorted by ``keys``, the first the most significant (stable sorts from the last key on)."""
        order = torch.arange(len(colour))
        for key in reversed(keys):
            order = order[key[order].argsort(descending=descending, stable=True)]
        return order

    groups = {"colour": ordered([colour], True)[:per_group].tolist(),
              "identity": ordered([lost, colour], True)[:per_group].tolist(),
              "best": ordered([missed, lost, colour], False)[:per_group].tolist()}
    order = [index for group in groups.values() for index in group]
    return edit_rows(sources[order], edits[order]), groups
