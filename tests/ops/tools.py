"""The binaries the ops tests run: promtool (Debian package ``prometheus``; ``make test`` installs it through
scripts/ensure_promtool.sh) and kubectl (for ``kubectl kustomize``). A missing one fails the test, never skips it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.catalog import REPO


def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if path is None:
        pytest.fail("promtool is not on PATH (nor at /usr/bin/promtool); these tests run `promtool check rules` and "
                    "`promtool test rules`. Install it: ./scripts/ensure_promtool.sh (apt-get install prometheus)")
    return path


def run_promtool(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def kubectl() -> str:
    path = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)
    if path is None:
        pytest.fail("kubectl is not on PATH (nor at /usr/bin/kubectl); these tests render with `kubectl kustomize`")
    return path


def kustomize(directory: Path) -> list[dict]:
    """The objects ``kubectl kustomize directory`` renders."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory.relative_to(REPO)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
