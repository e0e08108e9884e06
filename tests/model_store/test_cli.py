"""``python -m training publish`` and ``python -m training models`` as subprocesses, against a real SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import sys

from facegen.model.checkpoints import BUNDLED_CHECKPOINTS
from tests.model_store.conftest import BUNDLED_DIFFUSION, BUNDLED_VAE


def training(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_publish_with_an_alias_then_list_the_store(store_env: dict[str, str]) -> None:
    env = {**os.environ, **store_env}
    first = training("publish", "latest", "--checkpoints", str(BUNDLED_CHECKPOINTS), "--alias", "stable",
                     "--actor", "alice@test", env=env)
    assert first.returncode == 0, first.stderr
    assert f"published vae {BUNDLED_VAE} to {store_env['MODEL_STORE']}/" in first.stdout
    assert f"published diffusion {BUNDLED_DIFFUSION}" in first.stdout
    assert f"alias stable: (new) -> {BUNDLED_DIFFUSION}" in first.stdout

    again = training("publish", BUNDLED_DIFFUSION, "--checkpoints", str(BUNDLED_CHECKPOINTS), "--alias", "stable",
                     env=env)
    assert again.returncode == 0, again.stderr
    assert f"diffusion {BUNDLED_DIFFUSION} was already published" in again.stdout
    assert "0 files uploaded (0 bytes)" in again.stdout and "alias stable already points at" in again.stdout

    listing = training("models", env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(f"diffusion {BUNDLED_DIFFUSION} [stable] "
                                                                      "published by alice@test at "))
    assert "dpmpp-20-g3: not_smiling 100.0%, smiling 97.2%, KID×1000 66.5, FID 83.3" in lines[row + 1]
    assert any(line.startswith(f"vae       {BUNDLED_VAE}  published by alice@test") for line in lines)
    assert f"alias stable -> {BUNDLED_DIFFUSION} (moved by alice@test at " in listing.stdout

    history = training("models", "--history", "stable", env=env)
    assert history.returncode == 0, history.stderr
    assert history.stdout.splitlines()[0].endswith(f"  alice@test  (new) -> {BUNDLED_DIFFUSION}")


def test_alias_moves_an_alias_to_a_published_version_without_a_local_copy(store_env: dict[str, str]) -> None:
    """A roll-back from any machine: `alias` needs the store, not the version's folder (none under --checkpoints)."""
    env = {**os.environ, **store_env}
    assert training("publish", "latest", "--checkpoints", str(BUNDLED_CHECKPOINTS), env=env).returncode == 0
    moved = training("alias", "canary", BUNDLED_DIFFUSION, "--actor", "bob@test", env=env)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip() == f"alias canary: (new) -> {BUNDLED_DIFFUSION}"
    again = training("alias", "canary", BUNDLED_DIFFUSION, env=env)
    assert again.stdout.strip() == f"alias canary already points at {BUNDLED_DIFFUSION}"
    unknown = training("alias", "canary", "20990101-000000-000000", env=env)
    assert unknown.returncode == 1 and unknown.stderr.startswith("alias: ") and len(unknown.stderr.splitlines()) == 1
    history = training("models", "--history", "canary", env=env)
    assert history.stdout.splitlines()[0].endswith(f"  bob@test  (new) -> {BUNDLED_DIFFUSION}")
    assert len(history.stdout.splitlines()) == 1  # the no-op and the refused move wrote nothing


def test_the_commands_say_what_is_wrong_in_one_line(store_env: dict[str, str]) -> None:
    env = {**os.environ, **store_env}
    unknown = training("models", "--history", "never-set", env=env)
    assert unknown.returncode == 1 and unknown.stderr.strip() == (
        f"models: no alias 'never-set' in {store_env['MODEL_STORE']}/")
    vae_alias = training("publish", BUNDLED_VAE, "--kind", "vae", "--alias", "stable", env=env)
    assert vae_alias.returncode == 1 and "an alias names a diffusion version" in vae_alias.stderr
    no_store = training("models", env={k: v for k, v in env.items() if k != "MODEL_STORE"})
    assert no_store.returncode == 1 and "models: MODEL_STORE is not set" in no_store.stderr
