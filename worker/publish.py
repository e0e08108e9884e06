"""``python -m worker.publish [--checkpoints DIR] [--alias NAME]``: publish a checkpoints folder's diffusion versions
to the model store and, on first start, name the newest one.

The deployments' one-shot before the workers start (docker-compose.yml's profile ``s3``, the Job of
k8s/overlays/model-store), run from the worker image with the worker's identity: every diffusion version under
``DIR/diffusion/`` (default: the worker's ``CHECKPOINT_DIR``, the bundled checkpoints) is published with the VAE it
needs (:meth:`ModelStore.publish`: a version already in the store uploads nothing), then the alias (default
``stable``) is pointed at the newest plain (not distilled) version there **only when the store has no such alias
yet**. Later runs never move it: moving an alias is an operator's act (``python -m training publish VERSION --alias
stable``). One log line per version.

Exit status: 0 done; 2, with one line, when misconfigured (``MODEL_STORE`` unset or malformed, no diffusion version
under ``DIR``); 1, with one line, when the store cannot be reached or refuses (a different record under a
version's name, a version that fails its checks).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from facegen.contract.model_store import (
    ALIAS_PATTERN,
    SERVED_KIND,
    ModelStore,
    ModelStoreError,
    PublishResult,
    open_model_store,
)
from facegen.model.checkpoints import (
    LATEST,
    CheckpointError,
    list_versions,
    served_versions,
)

from .settings import WorkerSettings

log = logging.getLogger("worker.publish")
DEFAULT_ALIAS = "stable"


class Misconfigured(Exception):
    """A setting or an argument that no retry can fix."""


def alias_name(value: str) -> str:
    if not ALIAS_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an alias name ({ALIAS_PATTERN.pattern})")
    return value


def open_store() -> tuple[ModelStore, Path]:
    """The store ``MODEL_STORE`` names and the default checkpoints folder; :class:`Misconfigured` without a store."""
    try:
        settings = WorkerSettings()  # the store's settings and CHECKPOINT_DIR, as the worker reads them
    except ValidationError as exc:
        raise Misconfigured("; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                                      for e in exc.errors())) from None
    store = open_model_store(settings)
    if store is None:
        raise Misconfigured("MODEL_STORE is not set (s3://bucket/prefix; the server and credentials as for the "
                            "artifact store: S3_ENDPOINT_URL, S3_REGION, AWS_*)")
    return store, settings.checkpoint_dir


def summary(version: str, result: PublishResult) -> str:
    """One line for a published version (the VAE it needs comes with it)."""
    if not result.recorded:
        return f"{SERVED_KIND} {version}: already in the store, nothing uploaded"
    recorded = ", ".join(f"{ref.kind} {ref.version}" for ref in result.recorded)
    return (f"{SERVED_KIND} {version}: published {recorded}; {len(result.uploaded)} files uploaded "
            f"({result.uploaded_bytes} bytes), {len(result.present)} already in the store")


def publish_folder(store: ModelStore, root: Path, actor: str) -> None:
    """Publish every diffusion version under ``root`` (with its VAE), oldest first."""
    versions = list_versions(root, SERVED_KIND)
    if not versions:
        raise Misconfigured(f"no {SERVED_KIND} versions under {root / SERVED_KIND}")
    for manifest in versions:
        log.info("%s", summary(manifest.version, store.publish(root / SERVED_KIND / manifest.version, actor)))


def name_on_first_start(store: ModelStore, root: Path, alias: str, actor: str) -> None:
    """Point ``alias`` at the newest plain version under ``root``, unless the store already has that alias."""
    current = store.aliases().get(alias)
    if current is not None:
        log.info("alias %s points at %s (moved by %s at %s): left as it is", alias, current.version, current.by,
                 current.at)
        return
    try:
        newest, _student = served_versions(root, LATEST)
    except CheckpointError as exc:
        raise Misconfigured(f"nothing to point alias {alias} at: {exc}") from None
    store.set_alias(alias, newest, actor)
    log.info("alias %s: (new) -> %s, the newest plain version under %s", alias, newest, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=None, metavar="DIR",
                        help="the folder of <kind>/<version>/ checkpoints (default: CHECKPOINT_DIR)")
    parser.add_argument("--alias", type=alias_name, default=DEFAULT_ALIAS, metavar="NAME",
                        help=f"set on first start only (default: {DEFAULT_ALIAS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    actor = f"worker.publish@{socket.gethostname()}"
    try:
        store, default_root = open_store()
        root = args.checkpoints or default_root
        publish_folder(store, root, actor)
        name_on_first_start(store, root, args.alias, actor)
    except Misconfigured as exc:
        print(f"worker.publish: {exc}", file=sys.stderr)
        return 2
    except ModelStoreError as exc:
        print(f"worker.publish: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
