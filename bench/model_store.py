"""Wall time of the model store's operations on the bundled model (a diffusion version and its VAE, ~23 MB in 7
files) against a local SeaweedFS (scripts/s3ctl.py): a first publish, a re-publish (HEAD requests only), a pull
into an empty cache (download, sha256 of every file, rename) and a pull of a cached version (the cache's files
hashed again); medians of ``--repeat`` runs, each on a fresh prefix and cache.

    python -m bench.model_store --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

from bench.common import markdown_table, save
from facegen.contract.model_store import ModelStore, ModelStoreSettings
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, resolve_version
from scripts.s3ctl import S3Server

STEPS = ("publish", "re-publish", "pull", "pull, cached")


def one_round(server: S3Server, version_dir: os.PathLike) -> tuple[dict[str, float], int]:
    """Seconds of each step on a fresh prefix and cache, and the bytes the first publish uploaded."""
    os.environ["MODEL_STORE"] = f"s3://{server.bucket}/bench-{uuid.uuid4().hex[:8]}"
    store = ModelStore(ModelStoreSettings())
    seconds, uploaded = {}, 0
    with tempfile.TemporaryDirectory() as cache:
        for step in STEPS:
            start = time.perf_counter()
            if step.endswith("publish"):
                uploaded += store.publish(version_dir, "bench").uploaded_bytes  # the re-publish adds 0
            else:
                store.pull(store.resolve(os.path.basename(version_dir)), cache)
            seconds[step] = time.perf_counter() - start
    return seconds, uploaded


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model_store")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    version_dir = resolve_version(BUNDLED_CHECKPOINTS, "diffusion", "latest")
    server = S3Server().start()
    try:
        os.environ.update(server.env())
        rounds = [one_round(server, version_dir) for _ in range(args.repeat)]
    finally:
        server.stop()
    medians = {step: statistics.median(r[step] for r, _ in rounds) for step in STEPS}
    size = rounds[0][1]
    rows = [(step, medians[step], size / medians[step] / 1e6 if step in ("publish", "pull") else "-")
            for step in STEPS]
    save("model_store", {"bytes": size, "repeat": args.repeat, "median_s": medians},
         markdown_table(("step", "median s", "MB/s"), rows))


if __name__ == "__main__":
    main()
