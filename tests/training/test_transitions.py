"""The transitions measurement judged by a panel: a transition succeeds only when both of its ends are read right,
by the panel and by each member on its own."""

from __future__ import annotations

from pathlib import Path

import torch

from training.evaluation.judge import AttributeClassifier, JudgePanel
from training.evaluation.protocol import REPORT_SEED
from training.evaluation.transitions import evaluate_transitions, transition_scores, transitions_report


def test_success_needs_both_ends_read_right_by_the_panel_and_by_each_member() -> None:
    generator = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (3, 40, 3, 32, 32), dtype=torch.uint8, generator=generator)  # [F, n, 3, H, W]
    members = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(AttributeClassifier(1, 32))
    panel = JudgePanel(members, [1, 2])
    scores = transition_scores(clips, True, panel)
    first, last = panel.read(clips[0]), panel.read(clips[-1])
    assert scores["success"]["rate"] == int(((first.panel == 0) & (last.panel == 1)).sum()) / 40
    assert scores["first_as_source"]["rate"] == int((first.panel == 0).sum()) / 40
    assert scores["last_as_target"]["members"] == (last.members == 1).float().mean(dim=1).tolist()
    both = ((first.members == 0) & (last.members == 1)).float().mean(dim=1).tolist()
    assert scores["success"]["members"] == both
    assert both != scores["first_as_source"]["members"]  # the ends are combined member by member


def test_evaluate_transitions_reports_the_panel_and_its_members(tiny_checkpoints: Path, synth_dir: Path,
                                                                 tmp_path: Path) -> None:
    results = evaluate_transitions(tiny_checkpoints, "latest", synth_dir, n=3, frames=3, sampler="ddim", steps=2,
                                   guidance_scale=2.0, seed=REPORT_SEED, classifier_steps=3, precision="fp32",
                                   judges=2, judge_cache=tmp_path)
    assert results["judge_seeds"] == [REPORT_SEED, REPORT_SEED + 1]
    assert len(list(tmp_path.iterdir())) == 2  # each member cached apart
    for name in ("smiling", "not_smiling"):
        row = results[name]
        assert row["success"]["n"] == 3 and len(row["success"]["members"]) == 2
        assert row["success"]["rate"] <= min(row["first_as_source"]["rate"], row["last_as_target"]["rate"])
    report = transitions_report(results, "python -m training transitions …")
    assert "a panel of 2 classifiers" in report and "accuracy on the test split" in report
