"""The RQ adapter's claim against a real Redis: a batch's jobs leave their lists and become ``started``, each with an
RQ execution in the StartedJobRegistry, in one transaction; a job taken meanwhile is left out, and a list changed
while the claim read it is read again."""

from __future__ import annotations

import redis
from redis.client import Pipeline
from rq.job import Job, JobStatus

from facegen.contract.fair_queue import FairQueue
from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import DEFAULT_QUEUE
from tests.worker.test_worker_process import connection, enqueue  # noqa: F401 - the fixture
from worker.jobs import FacegenWorker, RqAdapter
from worker.settings import WorkerSettings


def dequeue(conn: redis.Redis) -> tuple[RqAdapter, FairQueue]:
    """What the worker's loop does before a batch: RQ dequeues the leader (into its intermediate list)."""
    queue = FairQueue(DEFAULT_QUEUE, connection=conn, serializer=JOB_SERIALIZER)
    worker = FacegenWorker([queue], connection=conn, name="claim-test", serializer=JOB_SERIALIZER,
                           settings=WorkerSettings(), perform_batch=lambda adapter: None, tick=lambda: None)
    leader, _ = FairQueue.dequeue_any([queue], None, connection=conn, serializer=JOB_SERIALIZER)
    return RqAdapter(worker, leader, queue), queue


def assert_started(conn: redis.Redis, queue: FairQueue, job_ids: list[str]) -> None:
    for job_id in job_ids:
        job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
        assert job.get_status() == JobStatus.STARTED and job.worker_name == "claim-test"
        assert job_id in queue.started_job_registry and len(job.get_executions()) == 1


def test_claim_starts_the_leader_and_its_waiting_companions_and_takes_them_off_their_lists(connection) -> None:  # noqa: F811
    queue = FairQueue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    jobs = [enqueue(queue, seed=seed) for seed in range(3)]
    adapter, queue = dequeue(connection)
    assert connection.lrange(queue.intermediate_queue_key, 0, -1) == [jobs[0].id.encode()]
    claimed = adapter.claim(adapter.waiting(10))
    assert [job.id for job in claimed] == [job.id for job in jobs]
    assert_started(connection, queue, [job.id for job in jobs])
    assert queue.count == 0 and connection.llen(queue.intermediate_queue_key) == 0
    assert set(adapter.executions) == {job.id for job in jobs}


def test_a_companion_taken_meanwhile_is_left_out(connection) -> None:  # noqa: F811
    queue = FairQueue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    jobs = [enqueue(queue, seed=seed) for seed in range(3)]
    adapter, queue = dequeue(connection)
    waiting = adapter.waiting(10)
    queue.remove(waiting[0].id)  # another worker dequeued it
    assert [job.id for job in adapter.claim(waiting)] == [jobs[0].id, jobs[2].id]
    assert Job.fetch(jobs[1].id, connection=connection,
                     serializer=JOB_SERIALIZER).get_status() == JobStatus.QUEUED


def test_a_list_changed_while_the_claim_reads_it_is_read_again(connection, monkeypatch) -> None:  # noqa: F811
    queue = FairQueue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    jobs = [enqueue(queue, seed=seed) for seed in range(3)]
    adapter, queue = dequeue(connection)
    reads = []
    execute = Pipeline.execute

    def execute_once_changed(pipe: Pipeline, *args, **kwargs):
        if not pipe.transaction:  # the claim's reads, after its WATCH: an enqueue lands in between
            reads.append(pipe)
            if len(reads) == 1:
                connection.rpush(queue.key, "arrived-meanwhile")
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", execute_once_changed)
    claimed = adapter.claim(adapter.waiting(10))
    assert len(reads) == 2  # the first claim's EXEC was refused, the second went through
    assert [job.id for job in claimed] == [job.id for job in jobs]
    assert_started(connection, queue, [job.id for job in jobs])
    assert connection.lrange(queue.key, 0, -1) == [b"arrived-meanwhile"]
