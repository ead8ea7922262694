"""Work sent to a Dask cluster through prefect-dask's DaskTaskRunner, one Prefect task per piece: soft-label shards,
and the candidates of a run trained side by side (train.parallel_candidates).

`DISTILL_DASK=local` works on a temporary LocalCluster (DISTILL_DASK_WORKERS processes, by default one per core at
the work's thread count), `DISTILL_DASK_ADDRESS=tcp://host:8786` on a running scheduler; with neither the work stays
in this process (soft_labels.generate_soft_labels, steps.distill_all). Every worker loads the teacher once, through
a worker plugin: the one piece of process state the pipeline keeps, dropped when the work ends.

Labeling: each task labels one shard and writes it to the store (a folder every worker sees, or S3); the run writes
the manifest once every shard's record is in and read back, so a failed or killed worker leaves an entry that is
never read, and the next run labels only the shards it lacks. A killed worker's task is rescheduled by Dask on
another worker first.

Candidates: each task trains one candidate (and its twin, its generations) from the worker's teacher and returns
it; checkpoints go to the run folder, which the workers must see (the same machine, or a shared DISTILL_HOME), so a
candidate whose worker died resumes where it was.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
import torch
from distributed import Worker, WorkerPlugin, get_worker
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext, get_run_context
from prefect_dask import DaskTaskRunner

from distill_core.errors import DistillError, SoftLabelError, TeacherError
from distill_core.modules import LoadedTeacher, resolve_device
from distill_core.settings import Settings
from distill_core.soft_labels import ShardJob, ShardRunner, label_shard, labeling_device
from distill_core.store import open_store

TeacherLoader = Callable[[], LoadedTeacher]
PLUGIN_TIMEOUT_S = 600.0  # loading a large teacher from the registry on a fresh worker
# Dask starts its worker processes with MALLOC_TRIM_THRESHOLD_=65536, to hand memory back sooner; it made every shard
# of MiniLM labeling 20-30% slower on a LocalCluster worker than in this process (benchmarks, scale). Unset for the
# LocalCluster a run starts; a running cluster's workers take it from their own dask config.
FAST_MALLOC = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
CANDIDATE_THREADS = 1  # torch threads of a worker that trains a candidate: a Dask worker process is one slot


class TeacherPlugin(WorkerPlugin):
    """Loads the teacher on each worker when the worker joins (or now, for those already there), at the labeling
    thread count and on the labeling device (`cpu` or `cuda`: the worker's GPU), and checks that it is the teacher
    the run labels with."""

    def __init__(self, load: TeacherLoader, identity: str, threads: int, device: str = "cpu") -> None:
        self.load, self.identity, self.threads, self.device = load, identity, threads, device
        # one name per batch: two runs on one cluster with the same teacher (two recipes) keep a plugin each
        self.name = f"distill-teacher-{hashlib.sha256(identity.encode()).hexdigest()[:12]}-{uuid.uuid4().hex[:8]}"
        self.teacher: LoadedTeacher | None = None
        self.failed: str | None = None

    def setup(self, worker: Worker) -> None:
        torch.set_num_threads(self.threads)
        try:
            teacher = self.load()
            if teacher.identity != self.identity:
                raise TeacherError(f"worker {worker.address} loaded teacher {teacher.identity}, not {self.identity}")
            teacher.module.to(resolve_device(self.device, f"labeling on Dask worker {worker.address}"))
        except Exception as err:
            self.failed = f"{type(err).__name__}: {err}"
            raise
        self.teacher = teacher

    def teardown(self, worker: Worker) -> None:
        self.teacher = None


def _unpickled(data: bytes, name: str, version: str, digest: str) -> LoadedTeacher:
    module = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    return LoadedTeacher(module.eval(), name, version, digest)


def teacher_loader(teacher: LoadedTeacher, tracking_uri: str) -> TeacherLoader:
    """How a worker gets the teacher: a registered version from the registry (its weights never pass through the
    scheduler), any other (an ensemble, a stage of the run's own) as its pickled module."""
    if teacher.version.isdigit():
        from distill_core.model_io import load_teacher

        return partial(load_teacher, teacher.name, teacher.version, tracking_uri)
    buffer = io.BytesIO()
    torch.save(teacher.module, buffer)
    return partial(_unpickled, buffer.getvalue(), teacher.name, teacher.version, teacher.content_digest)


def task_runner(settings: Settings, threads: int, tasks: int) -> DaskTaskRunner:
    """The DaskTaskRunner the settings ask for: a temporary LocalCluster (no more workers than tasks), or a running
    scheduler."""
    if settings.dask != "local":
        return DaskTaskRunner(address=settings.dask)
    workers = settings.dask_workers or max(1, min(tasks, (os.cpu_count() or 1) // threads))
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,  # one shard at a time per process: the teacher's threads are torch's
            "processes": True,
            "dashboard_address": ":0",
            "env": {"PREFECT_API_URL": _api_url()},  # the workers report to this process's Prefect API
        }
    )


def _configured_api() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _api_url() -> str:
    """The Prefect API this process reports to (PREFECT_API_URL), else its ephemeral server (started now if it is
    not yet): a worker left to itself would start an ephemeral server of its own."""
    url = _configured_api()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses in ephemeral mode
    server.start()
    return server.api_url


def shard_runner(settings: Settings, teacher: LoadedTeacher, cfg: Any, task: str, store_uri: str) -> ShardRunner | None:
    """Label shards on the Dask cluster the settings name, or None when they name none (this process labels)."""
    if settings.dask is None:
        return None
    _need_api(settings)
    return partial(_label_on_dask, settings, teacher, cfg, task, store_uri)


def _need_api(settings: Settings) -> None:
    if settings.dask != "local" and not _configured_api():
        raise DistillError(
            f"DISTILL_DASK_ADDRESS={settings.dask} needs a Prefect server that this process and the workers reach: "
            "set PREFECT_API_URL here and on the workers (`prefect server start`)"
        )


def _worker_teacher(name: str, timeout_s: float = PLUGIN_TIMEOUT_S) -> LoadedTeacher:
    """This worker's teacher. A worker that joins (or is restarted) takes tasks before its plugins are set up
    (distributed registers it running first), so wait for the plugin's teacher, or its failure."""
    worker, deadline = get_worker(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plugin = worker.plugins.get(name)
        if isinstance(plugin, TeacherPlugin) and plugin.failed:
            raise TeacherError(f"the teacher did not load on worker {worker.address}: {plugin.failed}")
        if isinstance(plugin, TeacherPlugin) and plugin.teacher is not None:
            return plugin.teacher
        time.sleep(0.05)
    raise TeacherError(f"the teacher was not loaded on worker {worker.address} within {timeout_s:.0f} s")


def _label_shard(job: ShardJob, cfg: Any, task: str, store_uri: str, key: str, plugin: str) -> dict[str, Any]:
    """One shard, labeled with this worker's teacher and written to the store; its manifest record."""
    record, _ = label_shard(_worker_teacher(plugin), job, cfg, task, open_store(store_uri), key)
    return record


def _train_candidate(name: str, train: Callable[..., Any], plugin: str) -> Any:
    """One candidate, trained from this worker's teacher; where it and its generations trained names the worker."""
    outcome = train(teacher=_worker_teacher(plugin), log=get_run_logger().info)
    for result in [result for _, result in outcome.results()] + [stage.result for stage in outcome.stages]:
        result.trained_on = f"{result.trained_on}, Dask worker {get_worker().address}"
    return outcome


@dataclass
class _Batch:
    """What a batch flow sends to the cluster: one call of `task` per argument tuple (the plugin's name appended)."""

    plugin: TeacherPlugin
    task: Any  # a prefect Task
    calls: list[tuple[Any, ...]]
    names: list[str]  # how a failed call is named


# The batch flows' inputs, by run, in the process that runs them. As flow parameters Prefect would store them with
# the flow run and, like a closure's, pickle them into every task it sends to the cluster (the teacher included).
_BATCHES: dict[str, _Batch] = {}


def _run_batch(batch: str) -> tuple[list[Any], list[str]]:
    """Run a batch on the flow's DaskTaskRunner: the teacher plugin registered for the run, one task per call; the
    results of the calls that succeeded, in order, and a line for each that failed."""
    work = _BATCHES[batch]
    client = get_run_context().task_runner.client  # type: ignore[union-attr]
    crowded = sorted(address for address, threads in client.nthreads().items() if threads > 1)
    if crowded:  # torch's process-wide state (threads, seeds, tracing) is not shared safely by tasks in threads
        raise DistillError(
            f"Dask workers {', '.join(crowded[:3])} run several tasks at once in threads: start them with "
            "`dask worker --nthreads 1` (more processes with --nworkers), one labeling or training task each"
        )
    client.register_plugin(work.plugin)
    try:
        futures = [work.task.submit(*call, work.plugin.name) for call in work.calls]
        results, failed = [], []
        for name, future in zip(work.names, futures, strict=True):
            try:
                results.append(future.result())
            except Exception as err:  # the task's own error, or KilledWorker once Dask's allowed failures are spent
                failed.append(f"{name} ({type(err).__name__}: {str(err)[:200]})")
        return results, failed
    finally:
        client.unregister_worker_plugin(work.plugin.name)


# Prefect pickles a task's and a flow's function into every task it sends to the cluster. Decorated in place, a
# function is not found under its own name (the name holds the Task or Flow), so cloudpickle would copy it by value
# with the globals it reads (_BATCHES: the teacher); kept under its name, it travels as a reference.
label_shard_task = task(name="label-shard", cache_policy=NO_CACHE, task_run_name="label {job.shard.stem}")(_label_shard)
label_shards = flow(name="label-shards", validate_parameters=False)(_run_batch)
train_candidate_task = task(name="train-candidate", cache_policy=NO_CACHE, task_run_name="train {name}")(
    _train_candidate
)
train_candidates = flow(name="train-candidates", validate_parameters=False)(_run_batch)


def _on_dask(settings: Settings, batch_flow: Any, work: _Batch, threads: int) -> tuple[list[Any], list[str]]:
    """Run a batch flow as a subflow of the run's flow, on the cluster the settings name."""
    run = uuid.uuid4().hex
    _BATCHES[run] = work
    # Called from a task of the run's flow (the soft-label step), the batch flow would carry that task's context
    # into every task it sends, and with it the task's parameters (the teacher's weights among them): run it as a
    # subflow of the run's flow instead.
    outside = TaskRunContext.__var__.set(None)  # type: ignore[arg-type]  # None: no task run (what .get() reads)
    try:
        with dask.config.set(FAST_MALLOC):
            return batch_flow.with_options(task_runner=task_runner(settings, threads, len(work.calls)))(run)
    finally:
        TaskRunContext.__var__.reset(outside)
        del _BATCHES[run]


def _label_on_dask(
    settings: Settings, teacher: LoadedTeacher, cfg: Any, task: str, store_uri: str, jobs: list[ShardJob], key: str
) -> list[dict[str, Any]]:
    threads = cfg.threads or 1
    plugin = TeacherPlugin(
        teacher_loader(teacher, settings.tracking_uri), teacher.identity, threads, labeling_device(cfg)
    )
    calls = [(job, cfg, task, store_uri, key) for job in jobs]
    work = _Batch(plugin, label_shard_task, calls, [job.shard.stem for job in jobs])
    records, failed = _on_dask(settings, label_shards, work, threads)
    if failed:
        raise SoftLabelError(
            f"{len(failed)} of {len(jobs)} shards of soft labels {key} failed: {'; '.join(failed[:3])}. The "
            f"{len(records)} labeled are stored; a rerun labels only the missing ones"
        )
    return records


# One a candidate: its name, and what trains it (train(teacher=, log=) -> its outcome).
CandidateJobs = Sequence[tuple[str, Callable[..., Any]]]


def candidate_runner(settings: Settings) -> Callable[[LoadedTeacher, CandidateJobs], list[Any]] | None:
    """Train candidates side by side on the Dask cluster the settings name, or None when they name none."""
    if settings.dask is None:
        return None
    _need_api(settings)
    return partial(_train_on_dask, settings)


def _train_on_dask(settings: Settings, teacher: LoadedTeacher, jobs: CandidateJobs) -> list[Any]:
    """Each (name, train) on a worker of one thread, the teacher loaded once per worker; the outcomes in order."""
    plugin = TeacherPlugin(teacher_loader(teacher, settings.tracking_uri), teacher.identity, CANDIDATE_THREADS)
    work = _Batch(plugin, train_candidate_task, list(jobs), [name for name, _ in jobs])
    outcomes, failed = _on_dask(settings, train_candidates, work, CANDIDATE_THREADS)
    if failed:
        raise DistillError(
            f"{len(failed)} of {len(jobs)} candidates failed on the Dask cluster: {'; '.join(failed[:3])}. Their "
            "checkpoints are kept: once the cause is fixed, a rerun resumes them"
        )
    return outcomes
