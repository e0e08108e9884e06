"""The model store's pure parts, without a server: its settings, the model card, and the seal it checks agreeing
with the one facegen.model.checkpoints writes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from facegen.contract import model_store
from facegen.contract.model_store import (
    ModelStoreSettings,
    format_card,
    model_card,
    open_model_store,
    store_location,
)
from facegen.model import checkpoints
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, EVALUATION_FILE, MANIFEST_FILE, read_evaluation
from tests.model_store.conftest import BUNDLED_DIFFUSION


def test_model_store_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_model_store(ModelStoreSettings()) is None  # unset: no store
    assert ModelStoreSettings(model_store="").model_store is None
    assert store_location("s3://models/facegen/prod/") == ("models", "facegen/prod")
    assert store_location("s3://models") == ("models", "")
    for wrong in ("models/facegen", "https://host/models", "s3:///facegen", "s3://models/x?versionId=1"):
        with pytest.raises(ValidationError, match="MODEL_STORE must be s3://bucket/prefix"):
            ModelStoreSettings(model_store=wrong)
    monkeypatch.setenv("MODEL_STORE", "s3://models/facegen")
    monkeypatch.setenv("S3_ENDPOINT_URL", "")  # the artifact store's server settings, shared: empty means AWS
    settings = ModelStoreSettings()
    assert settings.s3_endpoint_url is None
    store = open_model_store(settings)
    assert store is not None and store.location == "s3://models/facegen/"
    assert store.blob_key("ab" * 32) == f"facegen/blobs/sha256/{'ab' * 32}"
    assert store.record_key("diffusion", "v1") == "facegen/versions/diffusion/v1.json"
    with pytest.raises(model_store.ModelStoreError, match="invalid version name"):
        store.record_key("diffusion", "../v1")
    with pytest.raises(model_store.ModelStoreError, match="invalid alias name"):
        store.alias_key("Stable/..", "current.json")


def test_the_store_checks_the_seal_checkpoints_write() -> None:
    """``manifest_integrity`` and ``sha256_file`` live in both rooms (neither may import the other): equal on every
    bundled version, and the store's check fails on a changed manifest as loading does."""
    for directory in (BUNDLED_CHECKPOINTS / kind / version.name for kind in ("vae", "diffusion")
                      for version in (BUNDLED_CHECKPOINTS / kind).iterdir()):
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        assert model_store.manifest_integrity(manifest) == checkpoints.manifest_integrity(manifest) == (
            manifest["integrity"])
        changed = {**manifest, "created_at": "2030-01-01"}
        assert model_store.manifest_integrity(changed) == checkpoints.manifest_integrity(changed) != (
            manifest["integrity"])
        for path in directory.iterdir():
            assert model_store.sha256_file(path) == checkpoints.sha256_file(path)
    assert (model_store.MANIFEST_FILE, model_store.EVALUATION_FILE) == (MANIFEST_FILE, EVALUATION_FILE)


def test_the_model_card_of_the_bundled_version() -> None:
    card = model_card(read_evaluation(BUNDLED_CHECKPOINTS / "diffusion" / BUNDLED_DIFFUSION))
    assert card["split"] == "test" and round(card["vae_psnr_db"], 2) == 33.22
    assert card["settings"]["dpmpp-20-g3"]["accuracy_smiling"] == 0.972
    assert not any(key.endswith(("_ci95", "_members")) for key in card["settings"]["dpmpp-20-g3"])
    line = format_card(card)
    assert "dpmpp-20-g3: not_smiling 100.0%, smiling 97.2%, KID×1000 66.5, FID 83.3" in line and "(test split)" in line
    assert model_card({}) == {} and format_card({}) == "-"
