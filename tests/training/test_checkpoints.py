"""Versioned checkpoints: round trip, latest, never overwritten, and refusal of anything tampered with."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from facegen.model.checkpoints import (
    BUNDLED_CHECKPOINTS,
    EVALUATION_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    list_versions,
    load_checkpoint,
    read_evaluation,
    read_manifest,
    record_evaluation,
    resolve_version,
    save_checkpoint,
    shared_parts,
    warm_start,
)
from facegen.model.config import DataConfig, VAEConfig, VAETrainConfig
from facegen.model.manifest import (
    FORMAT_VERSION,
    DiffusionManifest,
    ManifestError,
    TrainingRun,
    VAEManifest,
    parse_manifest,
)

FORMAT_1 = Path(__file__).resolve().parents[1] / "fixtures" / "format1"
MANIFEST = VAEManifest(model=VAEConfig(channels=(8,)), data=DataConfig(), attributes=("Smiling",),
                       dataset_fingerprint="f" * 64,
                       training=TrainingRun(VAETrainConfig(steps=1), 1, 10, "float32", 1, "cpu"))


def _save(root: Path, version: str | None = None, value: float = 1.0) -> Path:
    state = {"layer.weight": torch.full((3, 2), value), "layer.steps": torch.tensor([7])}
    return save_checkpoint(root, state, MANIFEST, dtype=torch.float16, version=version)


def test_round_trip_casts_and_describes_itself(tmp_path: Path) -> None:
    folder = _save(tmp_path, value=0.5)
    loaded = load_checkpoint(tmp_path, "vae", folder.name)
    assert loaded.state_dict["layer.weight"].dtype == torch.float16
    assert torch.equal(loaded.state_dict["layer.weight"].float(), torch.full((3, 2), 0.5))
    assert loaded.state_dict["layer.steps"].dtype == torch.int64  # integers are not cast
    manifest = loaded.manifest
    assert manifest.kind == "vae" and manifest.version == folder.name and manifest.model == VAEConfig(channels=(8,))
    assert set(manifest.files) == {WEIGHTS_FILE} and len(manifest.files[WEIGHTS_FILE]) == 64
    assert manifest.format_version == FORMAT_VERSION and manifest.weights_dtype == "float16"
    assert manifest.replace(version="", created_at="", weights_dtype="", files={}, integrity="") == MANIFEST


def test_latest_is_the_newest_and_versions_are_never_overwritten(tmp_path: Path) -> None:
    first = _save(tmp_path, "zzz-older")
    time.sleep(0.01)
    second = _save(tmp_path, "aaa-newer")
    assert resolve_version(tmp_path, "vae", "latest") == second  # by created_at, not by name
    assert [m.version for m in list_versions(tmp_path, "vae")] == [first.name, second.name]
    with pytest.raises(CheckpointError, match="never overwritten"):
        _save(tmp_path, "zzz-older")


def test_flipped_weight_byte_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_checkpoint(tmp_path, "vae", folder.name)


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated or replaced"):
        load_checkpoint(tmp_path, "vae", folder.name)


def test_edited_manifest_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["model"]["latent_channels"] = 3
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="integrity hash does not match"):
        load_checkpoint(tmp_path, "vae", folder.name)


def test_wrong_kind_missing_and_bad_names(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    (tmp_path / "diffusion").mkdir()
    (folder.parent.parent / "diffusion" / folder.name).symlink_to(folder)
    with pytest.raises(CheckpointError, match="expected 'diffusion'"):
        load_checkpoint(tmp_path, "diffusion", folder.name)
    with pytest.raises(CheckpointError, match="no such vae checkpoint"):
        load_checkpoint(tmp_path, "vae", "nope")
    with pytest.raises(CheckpointError, match="invalid checkpoint version"):
        load_checkpoint(tmp_path, "vae", "../vae")
    with pytest.raises(CheckpointError, match="no vae checkpoints"):
        load_checkpoint(tmp_path / "empty", "vae")


def test_an_evaluation_record_sits_beside_a_version_that_never_changes(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    sealed = {name: (folder / name).read_bytes() for name in (MANIFEST_FILE, WEIGHTS_FILE)}
    assert read_evaluation(folder) == {}
    record_evaluation(folder, {"evaluation": {"fid": 12.5}})
    assert record_evaluation(folder, {"tuning": {"seeds": [3]}}) == {"evaluation": {"fid": 12.5}, "tuning": {"seeds": [3]}}
    assert read_evaluation(folder) == {"evaluation": {"fid": 12.5}, "tuning": {"seeds": [3]}}
    assert {name: (folder / name).read_bytes() for name in sealed} == sealed  # byte for byte
    assert load_checkpoint(tmp_path, "vae", folder.name).manifest.metrics == MANIFEST.metrics


def test_an_evaluation_record_of_another_manifest_is_refused(tmp_path: Path) -> None:
    first, second = _save(tmp_path), _save(tmp_path)
    record_evaluation(first, {"evaluation": {"fid": 1.0}})
    shutil.copy(first / EVALUATION_FILE, second / EVALUATION_FILE)
    with pytest.raises(CheckpointError, match="another manifest"):
        read_evaluation(second)


def test_the_bundled_versions_are_sealed_and_their_records_match() -> None:
    """What git carries: the served diffusion version and its VAE, each verified, each with its evaluation record,
    and nothing else (every other version lives in the model store)."""
    served = load_checkpoint(BUNDLED_CHECKPOINTS, "diffusion")
    vae = load_checkpoint(BUNDLED_CHECKPOINTS, "vae", served.manifest.vae_version)
    assert [m.version for m in list_versions(BUNDLED_CHECKPOINTS, "diffusion")] == [served.version]
    assert [m.version for m in list_versions(BUNDLED_CHECKPOINTS, "vae")] == [vae.version]
    for checkpoint in (served, vae):
        assert read_evaluation(checkpoint.path)["evaluation"]
    weights = sum(path.stat().st_size for path in BUNDLED_CHECKPOINTS.rglob("*.safetensors"))
    assert weights <= 25 * 2**20


def test_retune_derives_a_new_version_with_the_same_weights(tiny_checkpoints: Path, tmp_path: Path) -> None:
    from training.__main__ import main

    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    source = load_checkpoint(root, "diffusion")
    assert main(["retune", "--checkpoints", str(root), "--guidance-scale", "5"]) == 0
    derived = load_checkpoint(root, "diffusion")  # the newest version
    assert derived.version != source.version and derived.manifest.derived_from == source.version
    assert derived.manifest.sampling == dataclasses.replace(source.manifest.sampling, guidance_scale=5.0)
    assert derived.manifest.files == source.manifest.files  # identical weight bytes
    assert derived.manifest.vae_version == source.manifest.vae_version
    assert load_checkpoint(root, "diffusion", source.version).manifest == source.manifest  # untouched


def test_format_1_manifests_migrate_to_typed_ones() -> None:
    """Manifests of the first format, as two published versions carry them."""
    vae = read_manifest(FORMAT_1 / "vae")
    assert isinstance(vae, VAEManifest) and vae.training.examples == 24000
    assert vae.training.config.landmark_weight == 0.0  # trained before the landmark loss existed
    diffusion = read_manifest(FORMAT_1 / "diffusion")
    assert isinstance(diffusion, DiffusionManifest) and diffusion.training.weights == "ema"
    assert diffusion.training.config.min_snr_gamma == 0.0 and diffusion.training.examples == 48000
    assert parse_manifest(diffusion.to_dict()) == diffusion  # the JSON form round-trips


def test_a_manifest_missing_a_field_or_from_an_unknown_format_is_refused(tmp_path: Path) -> None:
    raw = MANIFEST.to_dict()
    del raw["data"]
    with pytest.raises(ManifestError, match="misses the field 'data'"):
        parse_manifest(raw)
    with pytest.raises(ManifestError, match="format_version 7"):
        parse_manifest({**MANIFEST.to_dict(), "format_version": 7})


def test_the_same_encoder_exported_in_another_dtype_is_the_same_encoder(tmp_path: Path) -> None:
    encoder = {"encoder.conv.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    decoder = {"decoder.conv.weight": torch.ones(3, 4)}
    stored_half = save_checkpoint(tmp_path, {**encoder, **decoder}, MANIFEST, dtype=torch.float16, version="v-half").name
    as_loaded, _ = warm_start(tmp_path, "vae", stored_half)  # how training loads it: float32
    retrained_decoder = {**as_loaded.state_dict, "decoder.conv.weight": torch.zeros(3, 4)}
    exported_full = save_checkpoint(tmp_path, retrained_decoder, MANIFEST, dtype=torch.float32, version="v-full").name
    assert shared_parts(tmp_path, stored_half, exported_full) == ("encoder",)  # float16 values are exact in float32
    unrounded = save_checkpoint(tmp_path, {**encoder, **decoder}, MANIFEST, dtype=torch.float32, version="v-raw").name
    assert shared_parts(tmp_path, stored_half, unrounded) == ("decoder",)  # the float16 copy rounded the encoder


def test_a_fine_tune_of_one_part_can_replace_the_vae_of_a_diffusion_version(tiny_checkpoints: Path, synth_dir: Path,
                                                                             tmp_path: Path) -> None:
    from training.__main__ import main
    from training.train_vae import train_vae
    from training.trainer import RunOptions

    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    source = load_checkpoint(root, "diffusion").manifest
    parent = load_checkpoint(root, "vae", source.vae_version)
    tuned = {}
    for trained in ("decoder", "encoder", "both"):
        opts = RunOptions(synth_dir, root, tmp_path / f"run-{trained}", precision="fp32", threads=1,
                          init_from=source.vae_version)
        cfg = VAETrainConfig(steps=2, batch_size=8, log_every=1, train_encoder=trained != "decoder",
                             train_decoder=trained != "encoder")
        tuned[trained] = load_checkpoint(root, "vae", train_vae(DataConfig(), parent.manifest.model, cfg, opts).name)
    for part in ("decoder", "encoder"):
        for name, weight in parent.state_dict.items():
            changed = not torch.equal(weight, tuned[part].state_dict[name])
            assert changed == name.startswith(f"{part}."), (part, name)
    with pytest.raises(SystemExit, match="neither encodes nor decodes like"):
        main(["retune", "--checkpoints", str(root), "--diffusion", source.version, "--vae", tuned["both"].version])
    for part in ("decoder", "encoder"):
        assert main(["retune", "--checkpoints", str(root), "--diffusion", source.version,
                     "--vae", tuned[part].version]) == 0
        derived = load_checkpoint(root, "diffusion").manifest
        assert derived.vae_version == tuned[part].version and derived.files == source.files
    with pytest.raises(ValueError, match="nothing to train"):
        train_vae(DataConfig(), parent.manifest.model, VAETrainConfig(train_encoder=False, train_decoder=False), opts)
