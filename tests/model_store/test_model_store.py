"""The model store (facegen/contract/model_store.py) against a real SeaweedFS: publish, pull, verification,
records written once, aliases with their history. The bundled demo model (a diffusion version and its VAE) is the
published version; tests that need another version derive or re-seal a copy of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import pytest

from facegen.contract.model_store import (
    MANIFEST_FILE,
    ModelStore,
    ModelStoreSettings,
    ModelStoreUnavailable,
    NotPublished,
    RecordConflict,
    VerificationError,
    VersionRef,
)
from facegen.model.checkpoints import (
    BUNDLED_CHECKPOINTS,
    EVALUATION_FILE,
    WEIGHTS_FILE,
    derive_checkpoint,
    load_checkpoint,
    manifest_integrity,
    read_evaluation,
)
from scripts.s3ctl import S3Server
from tests.model_store.conftest import BUNDLED_DIFFUSION, BUNDLED_VAE, CuttingProxy, bucket_keys, files_under

BOTH = [VersionRef("vae", BUNDLED_VAE), VersionRef("diffusion", BUNDLED_DIFFUSION)]


def version_dir(root: Path, kind: str, version: str) -> Path:
    return root / kind / version


def copy_of_bundled(tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(BUNDLED_CHECKPOINTS, root)
    return root


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def test_publish_then_pull_gives_the_same_bytes_and_a_loadable_checkpoint(store: ModelStore, tmp_path: Path) -> None:
    result = store.publish(version_dir(BUNDLED_CHECKPOINTS, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    assert result.recorded == BOTH  # the VAE the manifest names first, then the version
    assert result.present == [] and result.uploaded_bytes > 20_000_000

    cache = tmp_path / "cache"
    assert store.pull(BUNDLED_DIFFUSION, cache) == cache / "diffusion" / BUNDLED_DIFFUSION
    for ref in BOTH:
        source, pulled = (version_dir(root, ref.kind, ref.version) for root in (BUNDLED_CHECKPOINTS, cache))
        assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in source.iterdir())
        for path in source.iterdir():
            assert (pulled / path.name).read_bytes() == path.read_bytes(), path.name
        assert read_evaluation(pulled) == read_evaluation(source)
    assert not [name for name in files_under(cache) if "/." in f"/{name}"]  # no staging folder left behind
    diffusion = load_checkpoint(cache, "diffusion", BUNDLED_DIFFUSION)
    assert diffusion.manifest.vae_version == BUNDLED_VAE
    assert load_checkpoint(cache, "vae", BUNDLED_VAE).state_dict.keys()

    record = store.record(BUNDLED_DIFFUSION)
    assert record.published_by == "alice@test" and record.requires == (BOTH[0],)
    assert record.manifest == json.loads((diffusion.path / MANIFEST_FILE).read_text())
    row = record.card["settings"]["dpmpp-20-g3"]  # the numbers of EVALUATION.md's table
    assert (row["accuracy_smiling"], row["accuracy_not_smiling"]) == (0.972, 1.0) and 0.06 < row["kid"] < 0.07
    assert [(r.kind, r.version) for r in store.versions()] == [("diffusion", BUNDLED_DIFFUSION), ("vae", BUNDLED_VAE)]


def test_a_republish_uploads_nothing_and_keeps_the_first_record(s3_server: S3Server, store: ModelStore) -> None:
    folder = version_dir(BUNDLED_CHECKPOINTS, "diffusion", BUNDLED_DIFFUSION)
    store.publish(folder, "alice@test")
    before = bucket_keys(s3_server, store)
    again = store.publish(folder, "bob@test")
    assert again.uploaded == [] and again.uploaded_bytes == 0 and again.recorded == []
    files = [path for ref in BOTH for path in version_dir(BUNDLED_CHECKPOINTS, ref.kind, ref.version).iterdir()]
    assert again.unchanged == BOTH and len(again.present) == len(files)
    assert bucket_keys(s3_server, store) == before  # not one object written again
    assert store.record(BUNDLED_DIFFUSION).published_by == "alice@test"


def test_a_derived_version_shares_the_blobs_of_the_files_it_keeps(store: ModelStore, tmp_path: Path) -> None:
    root = copy_of_bundled(tmp_path)
    store.publish(version_dir(root, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    derived = derive_checkpoint(root, "diffusion", BUNDLED_DIFFUSION)  # the same weights, a new manifest
    result = store.publish(derived, "alice@test")
    assert result.recorded == [VersionRef("diffusion", derived.name)]
    assert result.uploaded == [f"diffusion/{derived.name}/{MANIFEST_FILE}"]


@pytest.mark.parametrize("changed", ["manifest", "evaluation"])
def test_a_different_record_under_a_published_name_is_refused(s3_server: S3Server, store: ModelStore,
                                                              tmp_path: Path, changed: str) -> None:
    root = copy_of_bundled(tmp_path)
    folder = version_dir(root, "vae", BUNDLED_VAE)
    store.publish(folder, "alice@test")
    before = bucket_keys(s3_server, store)
    if changed == "manifest":  # another sealed manifest under the same name (another run, the same version name)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        manifest["created_at"] = "2030-01-01T00:00:00.000000+00:00"
        manifest["integrity"] = manifest_integrity(manifest)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
        (folder / EVALUATION_FILE).unlink()  # recorded for the old manifest
    else:  # numbers measured again after publishing
        record = json.loads((folder / EVALUATION_FILE).read_text())
        record["results"]["evaluation"]["vae_psnr_db"] = 40.0
        (folder / EVALUATION_FILE).write_text(json.dumps(record))
    with pytest.raises(RecordConflict, match=f"vae {BUNDLED_VAE} is already in .* by alice@test .* different "
                                             f".*{changed}.*never changes"):
        store.publish(folder, "mallory@test")
    assert bucket_keys(s3_server, store) == before  # refused before uploading anything
    assert store.record(BUNDLED_VAE, "vae").published_by == "alice@test"


@pytest.mark.parametrize("tampered", ["vae", "diffusion"])
def test_a_tampered_blob_is_refused_and_the_cache_stays_clean(s3_server: S3Server, store: ModelStore,
                                                             tmp_path: Path, tampered: str) -> None:
    store.publish(version_dir(BUNDLED_CHECKPOINTS, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    version = BUNDLED_VAE if tampered == "vae" else BUNDLED_DIFFUSION
    expected = store.record(version, tampered).files[WEIGHTS_FILE].sha256
    client, key = s3_server.client(), store.blob_key(expected)
    replaced = flip_last_byte(client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=replaced)  # whoever holds write access to the bucket

    cache = tmp_path / "cache"
    with pytest.raises(VerificationError) as refused:
        store.pull(BUNDLED_DIFFUSION, cache)
    message = str(refused.value)
    assert f"{tampered} {version}: {WEIGHTS_FILE}" in message and "replaced or is corrupt" in message
    assert expected in message and hashlib.sha256(replaced).hexdigest() in message
    # nothing of the refused version (no partial file, no staging folder); a VAE pulled before it stays, whole
    assert files_under(cache / tampered) == []
    if tampered == "diffusion":
        assert load_checkpoint(cache, "vae", BUNDLED_VAE).version == BUNDLED_VAE


def test_a_download_cut_short_is_refused_and_the_cache_stays_clean(
        store: ModelStore, cutting_store: tuple[ModelStore, CuttingProxy], tmp_path: Path) -> None:
    store.publish(version_dir(BUNDLED_CHECKPOINTS, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    through_proxy, proxy = cutting_store
    cache = tmp_path / "cache"
    with pytest.raises(VerificationError, match=rf"vae {BUNDLED_VAE}: {WEIGHTS_FILE}: sha256 [0-9a-f]{{64}} of the "
                                                r"\d+ bytes received does not match .* download cut short"):
        through_proxy.pull(BUNDLED_DIFFUSION, cache)
    assert proxy.cuts >= 1
    assert files_under(cache) == ["vae"]  # the kind's folder, empty: no partial file, no staging folder
    assert store.pull(BUNDLED_DIFFUSION, cache).is_dir()  # whole, without the proxy


def test_a_cached_version_is_checked_not_downloaded_again(s3_server: S3Server, store: ModelStore,
                                                          tmp_path: Path) -> None:
    store.publish(version_dir(BUNDLED_CHECKPOINTS, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    cache = tmp_path / "cache"
    folder = store.pull(BUNDLED_DIFFUSION, cache)
    for sha256 in {f.sha256 for f in store.record(BUNDLED_DIFFUSION).files.values()}:  # the store loses the blobs
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=store.blob_key(sha256))
    assert store.pull(BUNDLED_DIFFUSION, cache) == folder  # served from the cache, verified

    weights = folder / WEIGHTS_FILE
    weights.write_bytes(flip_last_byte(weights.read_bytes()))
    with pytest.raises(VerificationError, match=f"{weights}: sha256 .* does not match the manifest's"):
        store.pull(BUNDLED_DIFFUSION, cache)


def test_aliases_move_with_an_append_only_history(s3_server: S3Server, store: ModelStore, tmp_path: Path) -> None:
    root = copy_of_bundled(tmp_path)
    store.publish(version_dir(root, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    newer = derive_checkpoint(root, "diffusion", BUNDLED_DIFFUSION).name
    store.publish(version_dir(root, "diffusion", newer), "alice@test")

    first = store.set_alias("stable", BUNDLED_DIFFUSION, "alice@test")
    entries = {key: etag for key, etag in bucket_keys(s3_server, store).items() if "/history/" in key}
    moves = [first, store.set_alias("stable", newer, "bob@test"), store.set_alias("stable", BUNDLED_DIFFUSION,
                                                                                   "carol@test")]  # a roll-back
    assert store.set_alias("stable", BUNDLED_DIFFUSION, "dave@test") is None  # already there: no entry
    assert [(m.previous, m.version, m.by) for m in store.alias_history("stable")] == [
        (None, BUNDLED_DIFFUSION, "alice@test"), (BUNDLED_DIFFUSION, newer, "bob@test"),
        (newer, BUNDLED_DIFFUSION, "carol@test")]
    assert store.alias_history("stable") == moves
    assert [m.at for m in moves] == sorted(m.at for m in moves)
    after = bucket_keys(s3_server, store)
    assert all(after[key] == etag for key, etag in entries.items())  # the first entry is still there, unchanged

    store.set_alias("canary", newer, "bob@test")
    assert store.aliases() == {"canary": store.alias_history("canary")[0], "stable": moves[-1]}
    assert (store.resolve("stable"), store.resolve("canary"), store.resolve(newer)) == (
        BUNDLED_DIFFUSION, newer, newer)
    assert store.alias_history("never-set") == []
    with pytest.raises(NotPublished, match="no diffusion version 'missing'"):
        store.resolve("missing")
    with pytest.raises(NotPublished):
        store.set_alias("stable", BUNDLED_VAE, "alice@test")  # a VAE is not served on its own
    with pytest.raises(NotPublished):
        store.set_alias("stable", "20990101-000000-000000", "alice@test")


def test_a_read_only_identity_reads_and_lists_but_cannot_write(s3_server: S3Server, store: ModelStore,
                                                               store_env: dict[str, str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's identity of the deployments (SeaweedFS ``Read`` and ``List``): records, aliases, listings and
    pulls work; writing is refused by the server."""
    store.publish(version_dir(BUNDLED_CHECKPOINTS, "diffusion", BUNDLED_DIFFUSION), "alice@test")
    store.set_alias("stable", BUNDLED_DIFFUSION, "alice@test")
    for name, value in s3_server.api_env().items():
        monkeypatch.setenv(name, value)
    boto3.DEFAULT_SESSION = None  # the credentials are read again, as by a new process (and after the test)
    reader = ModelStore(ModelStoreSettings())
    assert reader.resolve("stable") == BUNDLED_DIFFUSION
    assert load_checkpoint(tmp_path, "diffusion", reader.pull(BUNDLED_DIFFUSION, tmp_path).name).version == (
        BUNDLED_DIFFUSION)
    assert [(r.kind, r.version) for r in reader.versions()] == [("diffusion", BUNDLED_DIFFUSION), ("vae", BUNDLED_VAE)]
    assert reader.aliases().keys() == {"stable"}
    with pytest.raises(ModelStoreUnavailable, match="could not upload .*AccessDenied"):
        reader.set_alias("canary", BUNDLED_DIFFUSION, "mallory@test")
    assert store.aliases().keys() == {"stable"}
