"""The latent attribute reader: a derived version that samples exactly as its source, a hashed part of it, and the
edit's hold guidance that moves an edit toward the input's readings of the attributes it leaves open."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facegen.model.checkpoints import (
    READER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    derive_checkpoint,
    load_checkpoint,
)
from facegen.model.config import EDIT_REGIONS, ReaderConfig, ReaderTrainConfig
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.networks.reader import LatentReader
from facegen.model.pipeline import LatentDiffusion
from facegen.model.regions import edit_mask
from training.data.celeba import load_split_labels
from training.evaluation.evaluate_edit import evaluate_edits
from training.train_reader import train_reader
from training.trainer import RunOptions


@pytest.fixture(scope="module")
def reader_checkpoints(tiny_checkpoints: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> tuple[Path, Path]:
    """A copy of the tiny checkpoints (their `latest` stays the same for other tests) with a reader version derived
    from the tiny diffusion version; returns the root and the new version's folder."""
    root = tmp_path_factory.mktemp("reader") / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    opts = RunOptions(synth_dir, root, run_dir=Path("."), device="cpu", threads=1)
    folder = train_reader("latest", ("Smiling", "Male"), ReaderTrainConfig(steps=20, batch_size=16), opts)
    return root, folder


def test_a_reader_version_keeps_its_sources_weights_and_records_what_it_reads(
        reader_checkpoints: tuple[Path, Path], synth_dir: Path) -> None:
    root, folder = reader_checkpoints
    derived = load_checkpoint(root, "diffusion", folder.name)
    source = load_checkpoint(root, "diffusion", derived.manifest.derived_from)
    assert source.manifest.reader is None and derived.manifest.reader is not None
    assert derived.manifest.reader.attributes == ("Smiling", "Male")
    assert derived.manifest.files[WEIGHTS_FILE] == source.manifest.files[WEIGHTS_FILE]  # samples as before
    accuracy = derived.manifest.metrics["reader_val_accuracy"]
    n_val = len(load_split_labels(synth_dir, "val", derived.manifest.data))
    assert set(accuracy) == {"Smiling", "Male"} and all(entry["n"] == n_val for entry in accuracy.values())
    model = LatentDiffusion.load(root, folder.name, "cpu", torch.float32)
    assert isinstance(model.reader, LatentReader) and not any(p.requires_grad for p in model.reader.parameters())
    retuned = derive_checkpoint(root, "diffusion", folder.name)  # a later derivation keeps the reader
    assert load_checkpoint(root, "diffusion", retuned.name).manifest.files[READER_FILE] == \
        derived.manifest.files[READER_FILE]


def test_a_tampered_reader_file_is_refused(reader_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    root, folder = reader_checkpoints
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    path = copy / "diffusion" / folder.name / READER_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=READER_FILE):
        LatentDiffusion.load(copy, folder.name, "cpu", torch.float32)


def test_hold_guidance_moves_an_edit_toward_the_inputs_readings_inside_the_region_only(tiny_checkpoints: Path) -> None:
    tiny = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    config = ReaderConfig(attributes=("Smiling", "Male", "Young"), in_channels=tiny.latent_shape[0],
                          channels=(16, 16), groups=4)
    model = dataclasses.replace(tiny, reader=LatentReader(config).eval().requires_grad_(False))
    latents = torch.randn((4, *model.latent_shape), generator=torch.Generator().manual_seed(4))
    targets = model.labels_for({"Smiling": True}).expand(4, -1)
    held, columns = model.held_readings(latents, targets)
    assert torch.equal(columns, torch.tensor([[0.0, 1.0, 1.0]]).expand(4, -1))  # Smiling is the edit's: not held

    def held_loss(edited: torch.Tensor) -> float:
        logits = model.reader(edited)
        return float((F.binary_cross_entropy_with_logits(logits, held, reduction="none") * columns).sum())

    edits = {scale: model.edit_latents(latents, targets, 4, 3, 2.0, ImageNoise([(0, i) for i in range(4)]),
                                       hold_guidance=scale) for scale in (0.0, 2.0)}
    assert held_loss(edits[2.0]) < held_loss(edits[0.0])
    outside = edit_mask(targets, model.attributes, model.unet.config.null_label, EDIT_REGIONS,
                        tuple(model.latent_shape[1:])).expand_as(latents) == 0
    assert torch.equal(edits[2.0][outside], latents[outside])


def test_evaluate_edit_sweeps_the_hold_guidance_of_a_reader_version(reader_checkpoints: tuple[Path, Path],
                                                                    synth_dir: Path) -> None:
    root, folder = reader_checkpoints
    results = evaluate_edits(root, folder.name, synth_dir, n=2, strengths=(0.5,), steps=4, guidance_scales=(2.0,),
                             classifier_steps=2, seed=0, precision="fp32", hold_guidances=(0.0, 4.0))
    assert results["reader"] is True
    assert [row["hold_guidance"] for row in results["rows"]] == [0.0, 0.0, 4.0, 4.0]
    assert results["rows"][0]["psnr_db"] != results["rows"][2]["psnr_db"]  # the guidance changed the edits


def test_the_hold_step_leaves_chroma_alone_when_guidance_does(reader_checkpoints: tuple[Path, Path]) -> None:
    """A version whose guidance leaves chroma to the conditional prediction (``chroma_projector``) holds attributes
    by shape and luminance alone: the hold's shift of x0 decodes to no change of chroma (to first order)."""
    from facegen.model.chroma import chroma_projector, colour_jacobian

    root, folder = reader_checkpoints
    model = LatentDiffusion.load(root, folder.name, "cpu", torch.float32)
    jacobian = colour_jacobian(model.vae.decoder, model.latent_shape, model.manifest.latent_scale)
    x0 = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    held = 1 - (model.reader(x0) > 0).float()  # readings the step must move toward: a gradient that is not zero
    columns, step = torch.ones_like(held), torch.ones(1, 1, *model.latent_shape[1:])
    shifts = {}
    for projector in (None, chroma_projector(jacobian)):
        model.chroma_projector = projector
        shifts[projector is None] = model.hold_step(x0, x0, held, columns, step, 1.0)[1] - x0
    colour = {plain: torch.einsum("kc,nchw->nkhw", jacobian, shift) for plain, shift in shifts.items()}
    assert colour[True][:, 1:].abs().max() > 1e-4  # the plain hold moves chroma
    assert colour[False][:, 1:].abs().max() < 1e-6 * colour[True][:, 1:].abs().max() + 1e-7
    assert torch.allclose(colour[False][:, 0], colour[True][:, 0], atol=1e-6)  # and the same luminance
