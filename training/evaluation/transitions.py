"""Attribute transitions: the same noise sampled under a condition that moves from the opposite of the wanted
attribute values to them, and how well that works on a model.

Frame ``f`` of ``F`` conditions on ``w_f = f / (F - 1)`` of the way: an attribute wanted ``True`` takes the label
value ``w_f``, one wanted ``False`` ``1 - w_f``; the UNet blends the label vectors of 0 and 1 linearly
(:class:`~facegen.model.networks.unet.AttributeEmbedding`). Every frame of an image draws its noise from the same stream
and runs the same sampler, so only the condition changes.

``python -m training transitions`` (:func:`evaluate_transitions`) measures on ``n`` faces per target value:

- ``success``: the judge panel (``evaluate``'s, :class:`~training.evaluation.judge.JudgePanel`) reads the first frame as the
  source value and the last as the target (with a 95% Wilson interval and each member's rate; the product goal is
  >= 90%);
- ``first_as_source`` / ``last_as_target``: each end alone;
- ``identity_psnr_db``: PSNR between the first and last frames over the upper half of the face (eyes, brows,
  hair: what makes the person and what a smile barely moves), beside ``other_face_psnr_db``, the same between
  different faces' last frames (what "another person" scores);
- ``largest_step``: the largest change between consecutive frames as a fraction of the summed changes (``1/(F-1)``
  is perfectly even, 1 a jump in one frame), mean over faces.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from facegen.model.device import pick_device, pick_dtype
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.imaging import to_float, to_uint8
from facegen.model.pipeline import LatentDiffusion
from facegen.model.transitions import frame_attributes, frame_weights
from training.evaluation.protocol import JUDGE_PANEL_SIZE
from training.train_vae import psnr

from .judge import JudgePanel, describe_panel, first_attribute_only, format_rate, panel_rate, train_panel


@torch.no_grad()
def sample_transition(model: LatentDiffusion, attributes: dict[str, bool], pairs: list[tuple[int, int]],
                      frames: int, sampler: str, steps: int, guidance_scale: float) -> torch.Tensor:
    """``uint8 [frames, n, 3, H, W]``: the transition of each noise stream ``pairs[k]`` (``(seed, index)``), source
    first; all frames of a face in one batch."""
    labels = torch.stack([model.labels_for(frame_attributes(attributes, w)) for w in frame_weights(frames)])
    rows = labels.repeat_interleave(len(pairs), dim=0)  # frame-major: [frames * n, A]
    latents = model.sample_latents(rows, ImageNoise(pairs * frames, model.device), sampler, steps, guidance_scale)
    return to_uint8(model.decode(latents)).unflatten(0, (frames, len(pairs)))


def transition_scores(clips: torch.Tensor, target: bool, judge: JudgePanel) -> dict[str, Any]:
    """Scores of ``clips uint8 [F, n, 3, H, W]`` whose attribute 0 moves to ``target`` (see the module doc); each
    judged rate is the panel's, with every member's own."""
    source_read, target_read = judge.read(clips[0]).hits(int(not target)), judge.read(clips[-1]).hits(int(target))
    upper = clips.shape[-2] // 2
    steps = (to_float(clips[1:]) - to_float(clips[:-1])).abs().flatten(2).mean(2)  # [F-1, n]
    return {
        "success": panel_rate(source_read[0] & target_read[0], source_read[1] & target_read[1]),
        "first_as_source": panel_rate(*source_read),
        "last_as_target": panel_rate(*target_read),
        "identity_psnr_db": psnr(to_float(clips[-1][..., :upper, :]), to_float(clips[0][..., :upper, :])),
        "other_face_psnr_db": psnr(to_float(clips[-1][..., :upper, :]),
                                   to_float(clips[-1].roll(1, dims=0)[..., :upper, :])),
        "largest_step": float((steps.amax(0) / steps.sum(0).clamp_min(1e-8)).mean()),
    }


def evaluate_transitions(checkpoints: Path, version: str, data: Path, n: int, frames: int, sampler: str, steps: int,
                         guidance_scale: float | None, seed: int, classifier_steps: int, device: str = "cpu",
                         precision: str = "auto", batch: int = 8, judges: int = JUDGE_PANEL_SIZE,
                         judge_cache: Path | None = None) -> dict[str, Any]:
    """Transition scores for ``n`` faces per target value of the model's first attribute (faces ``(seed, i)``,
    ``batch`` faces at a time), judged by ``evaluate``'s judge panel (``judges`` classifiers from ``seed`` on,
    trained on ``data``'s train split, weights kept in ``judge_cache``; its accuracy on the test split reported
    beside)."""
    torch_device = pick_device(device)
    model = LatentDiffusion.load(checkpoints, version, torch_device, pick_dtype(torch_device, precision))
    guidance = model.sampling.guidance_scale if guidance_scale is None else guidance_scale
    judge, test_images, test_labels = train_panel(data, first_attribute_only(model.manifest.data),
                                                  classifier_steps, seed, judges, judge_cache)
    attribute = model.attributes[0]
    results: dict[str, Any] = {"version": model.version, "attribute": attribute, "n_per_label": n, "frames": frames,
                               "sampler": sampler, "steps": steps, "guidance_scale": guidance, "seed": seed,
                               "precision": str(model.dtype).removeprefix("torch."),
                               "judge_seeds": judge.seeds,
                               "judge_test_accuracy": judge.read(test_images).rate_of(test_labels[:, 0])}
    started = time.perf_counter()
    for target in (True, False):
        clips = torch.cat([sample_transition(model, {attribute: target},
                                             [(seed, i) for i in range(start, min(start + batch, n))], frames,
                                             sampler, steps, guidance) for start in range(0, n, batch)], dim=1)
        results[("" if target else "not_") + attribute.lower()] = transition_scores(clips, target, judge)
    results["seconds_per_frame"] = (time.perf_counter() - started) / (2 * n * frames)
    return results


def transitions_report(results: dict[str, Any], command: str) -> str:
    """The measurement as a Markdown table, one row per target value."""
    label = results["attribute"].lower()
    lines = [f"Model `{results['version']}`, {results['sampler']} {results['steps']} steps, guidance "
             f"{results['guidance_scale']:g}, {results['frames']} frames, {results['precision']}, seed "
             f"{results['seed']}, n = {results['n_per_label']} faces per target; "
             f"{results['seconds_per_frame']:.3f} s per frame; {describe_panel(results['judge_seeds'])}; its "
             f"accuracy on the test split {format_rate(results['judge_test_accuracy'])}. Command: `{command}`", "",
             "| transition | success: first read as source and last as target [95% CI] | first as source | "
             "last as target | upper-face PSNR first/last (other faces) | largest step |",
             "|---|---|---|---|---|---|"]
    for target, name in ((True, label), (False, f"not_{label}")):
        row = results[name]
        source = f"not_{label}" if target else label
        lines.append(f"| {source} -> {name} | {format_rate(row['success'])} | {format_rate(row['first_as_source'])} | "
                     f"{format_rate(row['last_as_target'])} | {row['identity_psnr_db']:.1f} dB "
                     f"({row['other_face_psnr_db']:.1f} dB) | {row['largest_step']:.2f} |")
    return "\n".join(lines) + "\n"
