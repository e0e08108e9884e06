"""Versioned checkpoints: round trip, latest, never overwritten, and refusal of anything tampered with."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from training.checkpoints import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    list_versions,
    load_checkpoint,
    resolve_version,
    save_checkpoint,
    update_metrics,
)


def _save(root: Path, version: str | None = None, value: float = 1.0) -> Path:
    state = {"layer.weight": torch.full((3, 2), value), "layer.steps": torch.tensor([7])}
    return save_checkpoint(root, "vae", state, {"model": {"width": 2}}, dtype=torch.float16, version=version)


def test_round_trip_casts_and_describes_itself(tmp_path: Path) -> None:
    folder = _save(tmp_path, value=0.5)
    loaded = load_checkpoint(tmp_path, "vae", folder.name)
    assert loaded.state_dict["layer.weight"].dtype == torch.float16
    assert torch.equal(loaded.state_dict["layer.weight"].float(), torch.full((3, 2), 0.5))
    assert loaded.state_dict["layer.steps"].dtype == torch.int64  # integers are not cast
    manifest = loaded.manifest
    assert manifest["kind"] == "vae" and manifest["version"] == folder.name and manifest["model"] == {"width": 2}
    assert set(manifest["files"]) == {WEIGHTS_FILE} and len(manifest["files"][WEIGHTS_FILE]) == 64


def test_latest_is_the_newest_and_versions_are_never_overwritten(tmp_path: Path) -> None:
    first = _save(tmp_path, "zzz-older")
    time.sleep(0.01)
    second = _save(tmp_path, "aaa-newer")
    assert resolve_version(tmp_path, "vae", "latest") == second  # by created_at, not by name
    assert [m["version"] for m in list_versions(tmp_path, "vae")] == [first.name, second.name]
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
    manifest["model"]["width"] = 3
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


def test_update_metrics_reseals_the_manifest(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    update_metrics(folder, {"fid": 12.5})
    assert load_checkpoint(tmp_path, "vae", folder.name).manifest["metrics"] == {"fid": 12.5}


def test_retune_derives_a_new_version_with_the_same_weights(tiny_checkpoints: Path, tmp_path: Path) -> None:
    from training.__main__ import main

    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    source = load_checkpoint(root, "diffusion")
    assert main(["retune", "--checkpoints", str(root), "--guidance-scale", "5"]) == 0
    derived = load_checkpoint(root, "diffusion")  # the newest version
    assert derived.version != source.version and derived.manifest["derived_from"] == source.version
    assert derived.manifest["sampling"] == {**source.manifest["sampling"], "guidance_scale": 5.0}
    assert derived.manifest["files"] == source.manifest["files"]  # identical weight bytes
    assert derived.manifest["vae_version"] == source.manifest["vae_version"]
    assert load_checkpoint(root, "diffusion", source.version).manifest == source.manifest  # untouched
