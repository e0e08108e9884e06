"""``python -m training student-fit``: a jump student's loss on the chains of its own bank against new chains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from facegen.model.checkpoints import load_checkpoint
from facegen.model.config import DistillConfig
from facegen.model.diffusion.consistency import consistency_output, jump_steps
from facegen.model.pipeline import LatentDiffusion
from tests.training.test_jumps import JUMPS
from training.__main__ import main
from training.distill import distill
from training.evaluation.student_fit import CHAIN_SETS, fit_table, student_fit
from training.student_training import pseudo_huber
from training.trainer import RunOptions


@pytest.fixture(scope="module")
def jump_student(tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """``(checkpoints, student version, latent cache)``: a jump student of the tiny teacher, 2 iterations on 8
    chains, its bank in the cache."""
    tmp_path = tmp_path_factory.mktemp("fit")
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    cfg = DistillConfig(method="trajectory-consistency", trajectories=8, trajectory_chunk=4, steps=2, batch_size=8,
                        warmup=1, log_every=1, lr=1e-3)
    opts = RunOptions(tmp_path / "no-data", root, tmp_path / "run", precision="fp32", threads=1,
                      latent_cache=tmp_path / "cache")
    folder = distill(load_checkpoint(root, "diffusion", "latest").version, cfg, JUMPS, opts)
    return root, folder.name, tmp_path / "cache"


def test_the_fit_reads_its_own_chains_from_the_bank_and_draws_new_ones(jump_student: tuple[Path, str, Path]
                                                                       ) -> None:
    root, version, cache = jump_student
    (own,) = (cache / "trajectories").iterdir()
    before = {path.name: path.stat().st_mtime_ns for path in own.iterdir()}
    losses, sampling = student_fit(root, version, cache, 4, torch.device("cpu"), torch.float32, show_progress=False)
    assert {path.name: path.stat().st_mtime_ns for path in own.iterdir()} == before  # nothing solved again
    (new,) = set((cache / "trajectories").iterdir()) - {own}
    assert [path.name for path in new.iterdir()] == ["4-00000.pt"]
    assert not torch.equal(torch.load(new / "4-00000.pt")["x0"], torch.load(own / "4-00000.pt")["x0"])
    assert sampling == JUMPS and list(losses) == list(CHAIN_SETS)
    assert all(len(values) == len(jump_steps(20, 4)) for values in losses.values())

    # the one-step jump of each set: the student's f at the chains' starts against their samples
    pipeline = LatentDiffusion.load(root, version)
    huber_c = pipeline.manifest.training.config.huber_c
    for name, folder in zip(CHAIN_SETS, (own, new), strict=True):
        bank = torch.load(folder / "4-00000.pt")
        x_t, t = bank["states"][:, 0].float(), torch.full((4,), 999)
        with torch.no_grad():
            output = pipeline.unet(x_t, t, bank["labels"], guidance=bank["guidance"], target=torch.full((4,), -1))
            f = consistency_output(pipeline.schedule, JUMPS, output.float(), x_t, t)
        assert losses[name][0] == pytest.approx(float(pseudo_huber(f, bank["x0"], huber_c)), rel=1e-5)


def test_the_fit_table_has_a_column_per_step_count_and_a_loss_per_jump() -> None:
    losses = {name: [float(i) for i in range(len(jump_steps(20, 4)))] for name in CHAIN_SETS}
    header, rule, trained, unseen = fit_table(losses, JUMPS).splitlines()
    assert header == "| chains | 1 step | 2 steps | 3 steps | 4 steps |" and rule.count("---") == 5
    assert trained == "| trained on | 0.00 | 1.00 / 2.00 | 3.00 / 4.00 / 5.00 | 6.00 / 7.00 / 8.00 / 9.00 |"
    assert unseen.startswith("| never seen | 0.00 |")


def test_student_fit_refuses_a_version_that_is_no_jump_student(jump_student: tuple[Path, str, Path],
                                                               tiny_checkpoints: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    root, version, cache = jump_student
    teacher = load_checkpoint(tiny_checkpoints, "diffusion", "latest").version
    with pytest.raises(SystemExit, match=f"student-fit: {teacher} is no jump student"):
        main(["student-fit", "--diffusion", teacher, "--checkpoints", str(root), "--latent-cache", str(cache)])
    main(["student-fit", "--diffusion", version, "--checkpoints", str(root), "--latent-cache", str(cache),
          "--chains", "4"])
    assert "| trained on |" in capsys.readouterr().out
