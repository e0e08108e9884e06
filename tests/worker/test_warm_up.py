"""A real ``python -m worker`` process with ``COMPILE`` on: the compile buckets are warmed up before the worker
registers with RQ and takes its first job; an unsupported ``COMPILE`` stops it at start in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from rq import Queue
from rq.job import JobStatus

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import DEFAULT_QUEUE
from tests.conftest import ROOT
from tests.worker.test_worker_process import connection, enqueue, worker_env  # noqa: F401 - the fixture


def test_buckets_are_warmed_up_before_the_worker_registers_and_takes_a_job(tiny_checkpoints,
                                                                           connection) -> None:  # noqa: F811
    # waiting before the worker starts
    job = enqueue(Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER))
    # MAX_BATCH=1: two buckets (1 and 2 UNet rows). TORCHDYNAMO_DISABLE runs the compiled UNet eagerly: this test is
    # about the order of start-up (inductor on CPU takes ~6 minutes cold here); tests/worker/test_engine.py compiles.
    result = subprocess.run([sys.executable, "-m", "worker", "--burst"], cwd=ROOT,
                            env=worker_env(tiny_checkpoints, COMPILE="default", MAX_BATCH="1", TORCHDYNAMO_DISABLE="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    compiled = [i for i, line in enumerate(lines) if re.search(r"compiled bucket \d+ rows in [\d.]+ s", line)]
    assert len(compiled) == 2, result.stderr[-3000:]
    registered = first(r"Worker .* started with PID")  # RQ's register_birth
    taken = first(re.escape(job.id))  # RQ logs each job it dequeues
    assert max(compiled) < first("warm-up done") < registered < taken
    assert job.get_status(refresh=True) == JobStatus.FINISHED


def test_compile_without_a_compiler_stops_the_worker_in_one_line(tiny_checkpoints) -> None:
    env = worker_env(tiny_checkpoints, COMPILE="default", DEVICE="cpu",
                     PATH=os.path.dirname(sys.executable))  # no g++ on the PATH
    env.pop("CXX", None)
    result = subprocess.run([sys.executable, "-m", "worker", "--burst"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "COMPILE=default cannot run here" in result.stderr and "C++ compiler" in result.stderr
    assert "Traceback" not in result.stderr
