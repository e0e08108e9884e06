"""Training: losses go down, runs are reproducible for a seed, resume continues exactly, DDP keeps ranks in sync."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training.train_diffusion as train_diffusion_module
from facegen.model.checkpoints import load_checkpoint
from facegen.model.config import (
    DataConfig,
    DiffusionTrainConfig,
    SamplingConfig,
    ScheduleConfig,
    UNetConfig,
    VAEConfig,
    VAETrainConfig,
)
from facegen.model.diffusion.schedule import NoiseSchedule
from facegen.model.manifest import Parent
from facegen.model.networks.unet import EMBEDDING_TABLE, UNet, narrowed_attribute_table
from facegen.model.pipeline import LatentDiffusion
from facegen.model.regions import contrast_boost, landmark_weights, weighted_l1
from tests.conftest import ROOT, TINY_UNET, TINY_VAE
from training.__main__ import main
from training.data.celeba import load_landmarks, load_split
from training.data.layout import LANDMARK_FILE
from training.evaluation.evaluate import Setting, evaluate_versions
from training.evaluation.protocol import REPORT_SEED
from training.runtime import BatchStream, Distributed, load_state
from training.train_diffusion import train_diffusion
from training.train_vae import face_contrast_boosts, train_vae
from training.trainer import RunOptions, Trainer


def _vae(data: Path, root: Path, run: Path, steps: int, **train) -> Path:
    opts = RunOptions(data, root, run, precision="fp32", threads=1)
    cfg = VAETrainConfig(steps=steps, batch_size=8, log_every=1, save_every=2, **train)
    return train_vae(DataConfig(image_size=32), VAEConfig(**TINY_VAE), cfg, opts)


def _losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r]


def test_vae_loss_goes_down(synth_dir: Path, tmp_path: Path) -> None:
    _vae(synth_dir, tmp_path / "ck", tmp_path / "run", 24, lr=2e-3)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4


def test_same_seed_same_weights_and_resume_is_exact(synth_dir: Path, tmp_path: Path) -> None:
    a = _vae(synth_dir, tmp_path / "ck", tmp_path / "a", 4)
    b = _vae(synth_dir, tmp_path / "ck", tmp_path / "b", 4)
    _vae(synth_dir, tmp_path / "ck", tmp_path / "c", 2)  # stop after 2 steps (state saved) ...
    c = _vae(synth_dir, tmp_path / "ck", tmp_path / "c", 4)  # ... and resume to 4
    d = _vae(synth_dir, tmp_path / "ck", tmp_path / "d", 4, seed=1)
    weights = {k: load_checkpoint(tmp_path / "ck", "vae", p.name).state_dict for k, p in zip("abcd", (a, b, c, d), strict=True)}
    for name in weights["a"]:
        assert torch.equal(weights["a"][name], weights["b"][name]), name
        assert torch.equal(weights["a"][name], weights["c"][name]), name
    assert any(not torch.equal(weights["a"][n], weights["d"][n]) for n in weights["a"])


def test_diffusion_loss_goes_down_and_manifest_describes_the_model(tiny_checkpoints: Path, synth_dir: Path,
                                                                  tmp_path: Path) -> None:
    opts = RunOptions(synth_dir, tiny_checkpoints, tmp_path / "run", precision="fp32", threads=1)
    # plain MSE here: Min-SNR weights (tested below) scale each sample's loss by its timestep and hide the trend
    cfg = DiffusionTrainConfig(steps=30, batch_size=32, lr=2e-3, warmup=2, log_every=1, min_snr_gamma=0.0)
    folder = train_diffusion("latest", UNetConfig(**TINY_UNET), ScheduleConfig(), SamplingConfig(), cfg, opts)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30 and sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.01
    manifest = load_checkpoint(tiny_checkpoints, "diffusion", folder.name).manifest
    vae_manifest = load_checkpoint(tiny_checkpoints, "vae", manifest.vae_version).manifest
    assert manifest.attributes == ("Smiling",) and manifest.latent_shape[0] == 4
    assert 0 < manifest.latent_scale < 100 and manifest.latent_clip > 1
    assert manifest.dataset_fingerprint == vae_manifest.dataset_fingerprint
    assert manifest.training.weights == "ema" and manifest.training.config == cfg
    model = LatentDiffusion.load(tiny_checkpoints, folder.name)  # rebuilt from the manifests alone
    assert model.unet.config.base_channels == TINY_UNET["base_channels"]


def test_a_latent_cache_is_written_once_and_gives_the_same_model(tiny_checkpoints: Path, synth_dir: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "latents"
    cfg = DiffusionTrainConfig(steps=2, batch_size=16, warmup=1, log_every=1)
    folders = []
    for run in ("first", "second"):
        if run == "second":  # a cache hit needs the labels alone: decoding an image now fails the run
            monkeypatch.setattr(train_diffusion_module, "load_split",
                                lambda *args, **kwargs: pytest.fail("a cache hit decoded the training images"))
        opts = RunOptions(synth_dir, tiny_checkpoints, tmp_path / run, precision="fp32", threads=1, latent_cache=cache)
        folders.append(train_diffusion("latest", UNetConfig(**TINY_UNET), ScheduleConfig(), SamplingConfig(), cfg, opts))
        assert ("read from the cache" in capsys.readouterr().out) == (run == "second")
    (stored,) = cache.iterdir()
    means = torch.load(stored, weights_only=True)["means"]
    assert means.shape[1] == 4 and stored.name.endswith("-all-mirrored.pt")
    first, second = (load_checkpoint(tiny_checkpoints, "diffusion", f.name).state_dict for f in folders)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_ddp_two_cpu_processes_stay_in_sync(tiny_checkpoints: Path, synth_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: both ranks end with identical weights and rank 0 writes the checkpoint."""
    script = tmp_path / "ddp_check.py"
    script.write_text(f"""
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from facegen.model.config import DiffusionTrainConfig, SamplingConfig, ScheduleConfig, UNetConfig
from training.trainer import RunOptions, Trainer
import training.train_diffusion as td
trained = {{}}
class RecordingEMA(td.EMA):  # keeps a handle on each rank's trained network
    def __init__(self, model, decay):
        super().__init__(model, decay)
        trained["model"] = model
td.EMA = RecordingEMA
opts = RunOptions(Path({str(synth_dir)!r}), Path({str(tiny_checkpoints)!r}), Path({str(tmp_path / "run")!r}),
                  precision="fp32", threads=1)
td.train_diffusion("latest", UNetConfig(**{TINY_UNET!r}), ScheduleConfig(), SamplingConfig(),
                   DiffusionTrainConfig(steps=3, batch_size=8, warmup=1, log_every=1), opts)
weights = torch.cat([p.detach().flatten() for p in trained["model"].parameters()])
torch.save(weights, {str(tmp_path)!r} + "/rank" + os.environ["RANK"] + ".pt")
""")
    before = len(list((tiny_checkpoints / "diffusion").iterdir()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert rank0.numel() == sum(p.numel() for p in UNet(UNetConfig(**TINY_UNET)).parameters())
    assert len(list((tiny_checkpoints / "diffusion").iterdir())) == before + 1


def test_ddp_fine_tunes_one_half_of_the_vae(tiny_checkpoints: Path, synth_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes, the decoder frozen: the run ends (DDP reduces only what is trained) and the
    exported version keeps its parent's decoder bit for bit."""
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    parent = load_checkpoint(root, "vae")
    script = tmp_path / "ddp_vae.py"
    script.write_text(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from facegen.model.config import DataConfig, VAEConfig, VAETrainConfig
from training.train_vae import face_contrast_boosts, train_vae
from training.trainer import RunOptions
opts = RunOptions(Path({str(synth_dir)!r}), Path({str(root)!r}), Path({str(tmp_path / "run")!r}), precision="fp32",
                  threads=1, init_from={parent.version!r})
train_vae(DataConfig(), VAEConfig(), VAETrainConfig(steps=3, batch_size=4, log_every=1,
                                                       train_decoder=False), opts)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    child = load_checkpoint(root, "vae")
    assert child.manifest.training.init_from.version == parent.version
    for name, weight in parent.state_dict.items():
        assert torch.equal(weight, child.state_dict[name]) == name.startswith("decoder."), name


def test_adversarial_vae_training_runs_with_a_patch_discriminator(synth_dir: Path, tmp_path: Path) -> None:
    _vae(synth_dir, tmp_path / "ck", tmp_path / "run", 4, adversarial_weight=0.1, adversarial_start=2)
    state = load_state(tmp_path / "run" / "state.pt")
    assert state["step"] == 4 and "disc" in state["modules"] and "disc" in state["optimizers"]
    assert set(state["scalers"]) == {"model", "disc"}  # the discriminator's loss has its own scaler
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / "run"))


def test_warm_start_begins_at_the_parent_and_records_the_lineage(tiny_checkpoints: Path, synth_dir: Path,
                                                                 tmp_path: Path) -> None:
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    parent = load_checkpoint(root, "vae", "latest")
    frozen = VAETrainConfig(steps=2, batch_size=4, lr=0.0, log_every=1)  # lr 0: the weights stay the parent's
    opts = RunOptions(synth_dir, root, tmp_path / "child", precision="fp32", threads=1, init_from=parent.version)
    child = load_checkpoint(root, "vae", train_vae(DataConfig(), VAEConfig(), frozen, opts).name)
    assert child.manifest.model == parent.manifest.model  # the architecture comes from the parent
    assert all(torch.equal(child.state_dict[name], value) for name, value in parent.state_dict.items())
    assert child.manifest.training.init_from == Parent(parent.version, parent.manifest.files["model.safetensors"],
                                                       (parent.version,))

    opts = RunOptions(synth_dir, root, tmp_path / "grandchild", precision="fp32", threads=1, init_from=child.version)
    grandchild = load_checkpoint(root, "vae", train_vae(DataConfig(), VAEConfig(), VAETrainConfig(
        steps=2, batch_size=4, lr=1e-3, log_every=1), opts).name)
    assert grandchild.manifest.training.init_from.lineage == (parent.version, child.version)
    assert any(not torch.equal(grandchild.state_dict[n], v) for n, v in child.state_dict.items())

    unet_parent = load_checkpoint(root, "diffusion", "latest")
    opts = RunOptions(synth_dir, root, tmp_path / "unet", precision="fp32", threads=1, init_from=unet_parent.version)
    unet_child = load_checkpoint(root, "diffusion", train_diffusion(
        grandchild.version, UNetConfig(), ScheduleConfig(), SamplingConfig(),
        DiffusionTrainConfig(steps=2, batch_size=8, lr=0.0, warmup=1, log_every=1), opts).name)
    assert unet_child.manifest.vae_version == grandchild.version  # continued on the newer VAE's latents
    assert unet_child.manifest.model == unet_parent.manifest.model
    assert all(torch.equal(unet_child.state_dict[name], value) for name, value in unet_parent.state_dict.items())
    assert unet_child.manifest.training.init_from.lineage == (unet_parent.version,)


def test_a_warm_start_may_add_attributes_and_starts_as_its_parent_where_they_are_open(tiny_checkpoints: Path, synth_dir: Path,
                                                                  tmp_path: Path) -> None:
    root = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints, root)
    parent = LatentDiffusion.load(root, "latest")
    opts = RunOptions(synth_dir, root, tmp_path / "grown", precision="fp32", threads=1, init_from=parent.version)
    frozen = DiffusionTrainConfig(steps=2, batch_size=8, lr=0.0, warmup=1, log_every=1, attribute_dropout=0.5)
    child = LatentDiffusion.load(root, train_diffusion(parent.manifest.vae_version, UNetConfig(), ScheduleConfig(),
                                                       SamplingConfig(), frozen, opts, ("Smiling", "Male")).name)
    assert child.attributes == ["Smiling", "Male"] and child.unet.config.num_attributes == 2
    null = float(parent.unet.config.null_label)
    x = torch.randn((3, *parent.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 990])
    smiling = torch.tensor([[1.0], [0.0], [null]])
    expected = parent.unet(x, t, smiling)
    male = {value: child.unet(x, t, torch.cat([smiling, torch.full((3, 1), value)], 1)) for value in (0.0, 1.0, null)}
    assert torch.allclose(male[null], expected)  # the new attribute left open: exactly the parent
    assert not torch.allclose(male[0.0], male[1.0], atol=1e-3)  # its two values start apart, each a fresh vector

    # evaluated side by side with its parent: one judge of the first attribute, the new one left open in sampling
    rows = evaluate_versions(root, [parent.version, child.version], synth_dir, n=2, settings=[Setting("ddim", 2, 2.0)],
                             seed=REPORT_SEED, classifier_steps=2, fid=False, precision="fp32")
    assert [row["attribute"] for row in rows] == ["Smiling", "Smiling"] and rows[0]["judge"] == rows[1]["judge"]

    # and narrowed back to Smiling alone by retune: what the child computes with Male open
    assert main(["retune", "--checkpoints", str(root), "--diffusion", child.version, "--attributes", "Smiling"]) == 0
    narrowed = LatentDiffusion.load(root, "latest")
    assert narrowed.attributes == ["Smiling"] and narrowed.manifest.derived_from == child.version
    assert torch.allclose(narrowed.unet(x, t, smiling), male[null], atol=1e-5)

    opts = RunOptions(synth_dir, root, tmp_path / "shrunk", precision="fp32", threads=1, init_from=child.version)
    with pytest.raises(ValueError, match="Male"):
        train_diffusion(parent.manifest.vae_version, UNetConfig(), ScheduleConfig(), SamplingConfig(), frozen, opts,
                        ("Smiling",))


def test_a_narrowed_table_computes_what_the_wider_model_computes_with_the_others_open() -> None:
    torch.manual_seed(0)
    wide = UNet(UNetConfig(**{**TINY_UNET, "num_attributes": 3})).eval()  # every vector random, null ones too
    narrow = UNet(UNetConfig(**{**TINY_UNET, "num_attributes": 1})).eval()
    table = narrowed_attribute_table(wide.state_dict()[EMBEDDING_TABLE], ("Male", "Smiling", "Young"), ("Smiling",),
                                     wide.config.null_label)
    narrow.load_state_dict({**wide.state_dict(), EMBEDDING_TABLE: table})
    null = float(wide.config.null_label)
    x, t = torch.randn(3, wide.config.in_channels, 8, 8), torch.tensor([5, 300, 900])
    smiling = torch.tensor([[1.0], [0.0], [null]])
    opened = torch.cat([torch.full((3, 1), null), smiling, torch.full((3, 1), null)], 1)
    assert torch.allclose(narrow(x, t, smiling), wide(x, t, opened), atol=1e-5)
    with pytest.raises(ValueError, match="some of the parent's"):
        narrowed_attribute_table(table, ("Smiling",), ("Male",), wide.config.null_label)


def test_landmarks_are_used_when_present_and_training_works_without_them(synth_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(synth_dir, bare)
    (bare / LANDMARK_FILE).unlink()
    with_marks = load_checkpoint(tmp_path / "ck", "vae", _vae(synth_dir, tmp_path / "ck", tmp_path / "a", 2).name)
    without = load_checkpoint(tmp_path / "ck", "vae", _vae(bare, tmp_path / "ck", tmp_path / "b", 2).name)
    assert with_marks.manifest.training.landmarks is True
    assert without.manifest.training.landmarks is False
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / "b"))
    # the weighted loss is a different objective: the same seed ends in different weights
    assert any(not torch.equal(with_marks.state_dict[n], v) for n, v in without.state_dict.items())


def test_landmark_weights_peak_on_the_features_and_uniform_weights_give_plain_l1() -> None:
    marks = torch.tensor([[[20.0, 24.0], [44.0, 24.0], [32.0, 34.0], [24.0, 44.0], [40.0, 44.0]]])
    weights = landmark_weights(marks, 64, sigma=0.06, gain=3.0)
    assert weights.shape == (1, 1, 64, 64)
    assert weights[0, 0, 24, 20] == pytest.approx(4.0) and weights[0, 0, 44, 32] == pytest.approx(4.0, abs=0.1)
    assert weights[0, 0, 2, 2] == pytest.approx(1.0, abs=1e-4) and weights.min() >= 1
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert weighted_l1(a, b, torch.full((2, 1, 8, 8), 5.0)) == pytest.approx(float((a - b).abs().mean()), rel=1e-6)


def test_contrast_boost_raises_the_mouth_weight_of_faces_whose_mouth_barely_stands_out() -> None:
    marks = torch.tensor([[[20.0, 24.0], [44.0, 24.0], [32.0, 34.0], [24.0, 44.0], [40.0, 44.0]]]).repeat(3, 1, 1)
    stroke = torch.zeros(1, 1, 64, 64)
    stroke[..., 43:46, 22:43] = 1.0  # a mouth line across the corners
    strength = torch.tensor([0.9, 0.3, 0.02]).view(3, 1, 1, 1)  # strong, faint, barely there
    images = torch.full((3, 3, 64, 64), -0.2) + strength * stroke
    boost = contrast_boost(images, marks, sigma=0.06, reference=0.2, cap=4.0)
    assert boost[0] == 1.0 and 1.5 < boost[1] < 4.0 and boost[2] == pytest.approx(4.0)
    plain, boosted = landmark_weights(marks, 64, 0.06, 3.0), landmark_weights(marks, 64, 0.06, 3.0, boost)
    assert torch.equal(boosted[0], plain[0])  # a mouth above the reference keeps its weight
    assert boosted[1, 0, 44, 32] == pytest.approx(1 + 3.0 * float(boost[1]), rel=1e-3)  # the mouth centre, boosted
    assert boosted[1, 0, 24, 20] == pytest.approx(plain[1, 0, 24, 20])  # the eyes are not
    # the eyes' pixels do not set the contrast: a high-contrast eye does not hide a faint mouth
    images[1, :, 22:27, 18:23] = 1.0
    assert contrast_boost(images, marks, sigma=0.06, reference=0.2, cap=4.0)[1] == pytest.approx(float(boost[1]), rel=1e-3)


def test_a_weighted_stream_draws_items_in_proportion_and_resumes_exactly() -> None:
    weights = torch.cat([torch.ones(50), torch.full((50,), 3.0)])
    stream = BatchStream(100, 10, 0, weights=weights)
    drawn = torch.cat([next(stream) for _ in range(2000)])
    heavy_share = float((drawn >= 50).float().mean())
    assert heavy_share == pytest.approx(0.75, abs=0.02)  # 3 : 1, over 20,000 draws
    state = stream.state()
    copy = BatchStream(100, 10, 0, weights=weights)
    copy.load(state)
    for _ in range(15):  # across the end of a pass, where a new order is drawn
        assert torch.equal(next(copy), next(stream))
    with pytest.raises(ValueError, match="weights of shape"):
        BatchStream(100, 10, 0, weights=torch.ones(99))


def test_contrast_sampling_draws_faint_mouths_more_often(synth_dir: Path, tmp_path: Path) -> None:
    cfg = VAETrainConfig(mouth_contrast=0.6, mouth_contrast_cap=4.0)
    data_cfg = DataConfig(image_size=32)
    images, _ = load_split(synth_dir, "train", data_cfg)
    boosts = face_contrast_boosts(images, load_landmarks(synth_dir, "train", data_cfg), cfg)
    assert boosts.shape == (len(images),) and boosts.min() >= 1 and boosts.max() <= 4
    assert boosts.max() > boosts.min()  # the synthetic faces' mouths differ in contrast
    assert _vae(synth_dir, tmp_path / "ck", tmp_path / "run", 2, mouth_contrast=0.6, contrast_sampling=True,
                perceptual_weight=0.0)  # no perceptual network is run then
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / "run"))
    with pytest.raises(ValueError, match="mouth_contrast > 0"):
        _vae(synth_dir, tmp_path / "ck", tmp_path / "off", 2, contrast_sampling=True)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_min_snr_weight_caps_the_easy_timesteps(prediction: str) -> None:
    schedule = NoiseSchedule(ScheduleConfig(prediction=prediction))
    t = torch.tensor([0, 300, 999])
    like = torch.zeros(3, 4, 2, 2)
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    expected = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    assert torch.allclose(schedule.min_snr_weight(t, 5.0, like).flatten(), expected, rtol=1e-5)
    assert schedule.min_snr_weight(t, 5.0, like)[0] < 0.01 if prediction == "v" else True  # t=0: SNR ~ 1e4
    assert torch.equal(schedule.min_snr_weight(t, 0.0, like), torch.ones(3, 1, 1, 1))


def _tiny_trainer(run: Path, steps: int, loss_scaling: bool = False, device: str = "cpu", **kwargs) -> Trainer:
    model = torch.nn.Linear(4, 1)
    return Trainer(run, steps, 1, 1000, Distributed(), torch.device(device), {"model": model},
                   {"model": torch.optim.SGD(model.parameters(), lr=0.1)}, loss_scaling, BatchStream(8, 4, 0),
                   **kwargs)


@pytest.mark.parametrize("loss_scaling", [False, True])  # True: the fp16 path's GradScaler (it runs on CPU too)
def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path, loss_scaling: bool) -> None:
    trainer = _tiny_trainer(tmp_path / "run", 6, loss_scaling)
    model = trainer.modules["model"]
    weights: list[torch.Tensor] = []

    def step_fn(step: int) -> dict[str, float]:
        loss = (model(torch.ones(2, 4)) - step).pow(2).mean() * (float("nan") if step in (2, 3) else 1.0)
        trainer.optimizer_step("model", loss, model.parameters(), 1.0)
        weights.append(model.weight.detach().clone())
        return {"loss": loss.item()}

    trainer.run(step_fn, "tiny")
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[1], weights[3])  # no update from NaN
    assert not torch.equal(weights[3], weights[4]) and torch.isfinite(weights[-1]).all()
    assert _losses(tmp_path / "run", "skipped_steps") == [0, 0, 1, 2, 2, 2]
    assert load_state(tmp_path / "run" / "state.pt")["skipped"] == 2


def test_a_run_fails_only_after_patience_skipped_steps_in_a_row(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path / "run", 10, nonfinite_patience=3)
    model = trainer.modules["model"]
    seen: list[int] = []

    def step_fn(step: int) -> dict[str, float]:
        seen.append(step)
        loss = model(torch.ones(2, 4)).sum() * (float("inf") if step >= 4 or step == 1 else 1.0)
        trainer.optimizer_step("model", loss, model.parameters(), 1.0)
        return {"loss": loss.item()}

    with pytest.raises(FloatingPointError, match="3 steps in a row had NaN/Inf gradients .* 4 skipped in all"):
        trainer.run(step_fn, "tiny")
    assert seen == list(range(7))  # step 1 alone was ridden out; 4, 5, 6 in a row stop the run


def test_cuda_rng_is_saved_and_restored_per_rank(tmp_path: Path, monkeypatch) -> None:
    """A GPU resume is exact: the trainer keeps CUDA's generator state too (patched torch.cuda)."""
    restored: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, 8, 9], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    _tiny_trainer(tmp_path / "run", 1, device="cuda:0").save(1)
    assert torch.equal(load_state(tmp_path / "run" / "state.pt")["rng"]["cuda"][0], torch.tensor([7, 8, 9]).byte())
    assert _tiny_trainer(tmp_path / "run", 2, device="cuda:0").resume() == 1
    assert len(restored) == 1 and torch.equal(restored[0][0], torch.tensor([7, 8, 9]).byte())
    assert restored[0][1] == torch.device("cuda", 0)
