"""Scale-out: soft labels sharded over a real Dask cluster (prefect-dask's DaskTaskRunner on a LocalCluster of two
worker processes), equal byte for byte to one process's, and a killed worker's shard relabeled alone."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import psutil
import pytest
import torch
from lm_models import trained_tiny_lm
from prefect import flow, task
from stack import wait_for
from toy_models import BagTeacher, KillingTeacher, WordHashTokenizer, one_student_recipe

from distill_core.ddp import DistributedTrainingError
from distill_core.errors import DistillError, SoftLabelError
from distill_core.lm_data import blocks_of, prepare_lm_dataset
from distill_core.model_io import load_teacher
from distill_core.modules import LoadedTeacher, WrappedTeacher, content_digest
from distill_core.recipe import (
    DistributedConfig,
    LMDataConfig,
    LMSignalConfig,
    LossTerm,
    SoftLabelConfig,
    StudentConfig,
    TrainConfig,
    parse_recipe,
)
from distill_core.settings import Settings
from distill_core.sharding import shard_runner
from distill_core.soft_labels import generate_soft_labels, load_soft_labels
from distill_core.steps import distill_all
from distill_core.store import LocalStore
from distill_core.students import build_student
from distill_core.train import TransferSet, train_student

CFG = SoftLabelConfig(batch_size=32, max_length=64, shard_rows=64, threads=1)


@pytest.fixture(scope="module")
def prefect_server():
    """One Prefect API for the module's runs; the workers report their task runs to it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _settings(tmp_path, tracking_uri: str) -> Settings:
    home = tmp_path / "home"
    return Settings(
        home=home,
        tracking_uri=tracking_uri,
        store_uri=str(home / "store"),
        ledger_uri=f"sqlite:///{home / 'ledger.db'}",
        dask="local",
        dask_workers=2,
    )


def _same_entry(one: LocalStore, other: LocalStore, key: str) -> None:
    """Both entries complete, with the same shard files holding the same bytes."""
    mine, theirs = load_soft_labels(one, key).manifest, load_soft_labels(other, key).manifest
    assert [s["file"] for s in mine["shards"]] == [s["file"] for s in theirs["shards"]]
    for shard in mine["shards"]:
        name = f"soft_labels/{key}/{shard['file']}"
        assert one.read_bytes(name) == other.read_bytes(name), shard["file"]


def _label(settings, teacher, dataset, cfg, task="classification"):
    store = LocalStore(settings.store_uri)
    return generate_soft_labels(
        teacher, dataset, cfg, store, task, runner=shard_runner(settings, teacher, cfg, task, store.uri)
    )


def test_dask_sharded_classifier_labels_equal_one_process_byte_for_byte(
    prefect_server, registered_teacher, small_dataset, tracking_uri, tmp_path
):
    teacher = load_teacher(*registered_teacher, tracking_uri)  # the workers load it from the registry
    settings = _settings(tmp_path, tracking_uri)

    @task
    def label_task():  # as in the pipeline: the labeling flow runs inside a task of the run's flow
        return _label(settings, teacher, small_dataset, CFG)

    sharded = flow(name="run")(lambda: label_task())()
    assert sharded.manifest["reused_shards"] == 0 and len(sharded.manifest["shards"]) > 4
    alone = generate_soft_labels(teacher, small_dataset, CFG, LocalStore(tmp_path / "alone"))
    assert alone.key == sharded.key
    assert sharded.manifest["labeled_on"] == alone.manifest["labeled_on"] == ["cpu, 1 thread"]  # CFG.threads 1
    _same_entry(LocalStore(settings.store_uri), LocalStore(tmp_path / "alone"), sharded.key)
    for split in alone.signal:
        np.testing.assert_array_equal(sharded.signal[split], alone.signal[split])


def test_dask_sharded_lm_signals_equal_one_process_byte_for_byte(prefect_server, tracking_uri, tmp_path, recwarn):
    dataset = prepare_lm_dataset(
        LMDataConfig(max_documents=40, block_size=32, train_blocks=96, eval_blocks=16), tmp_path / "lm-data"
    )
    module = trained_tiny_lm(blocks_of(dataset, "train"), steps=20)
    teacher = LoadedTeacher(module, "tiny-lm", "trained-here", content_digest(module))  # sent to the workers pickled
    cfg = LMSignalConfig(kind="sampled", k=8, draws=20, shard_rows=32, batch_size=8, threads=1)
    settings = _settings(tmp_path, tracking_uri)
    sharded = _label(settings, teacher, dataset, cfg, "causal_lm")
    generate_soft_labels(teacher, dataset, cfg, LocalStore(tmp_path / "alone"), "causal_lm")
    _same_entry(LocalStore(settings.store_uri), LocalStore(tmp_path / "alone"), sharded.key)
    assert set(sharded.signal["transfer"]) == {"ids", "logprobs", "weights", "top1", "target_logprob"}
    # the teacher (12 MB here) went to each worker once, in its plugin, not inside every shard's task
    assert not [w for w in recwarn if "large graph" in str(w.message)]


def test_a_worker_killed_mid_shard_leaves_no_complete_entry_and_a_rerun_labels_only_the_missing_shards(
    prefect_server, small_dataset, tracking_uri, tmp_path
):
    texts = small_dataset.split("transfer")["text"].tolist()
    fatal = texts[100]  # a review of the second shard
    switch = tmp_path / "kill-switch"
    switch.touch()
    module = WrappedTeacher(KillingTeacher(fatal, str(switch)), WordHashTokenizer(), labels=small_dataset.labels)
    teacher = LoadedTeacher(module, "killing-teacher", "here", content_digest(module))
    settings = _settings(tmp_path, tracking_uri)
    store = LocalStore(settings.store_uri)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), pytest.raises(SoftLabelError) as err:
        _label(settings, teacher, small_dataset, CFG)
    killed = f"transfer-{100 // CFG.shard_rows * CFG.shard_rows:09d}"
    failed = int(str(err.value).split(" of ")[0])  # the killed worker's shard, and any others queued on it
    assert killed in str(err.value) and "KilledWorker" in str(err.value)
    stored = [k.rsplit("/", 1)[-1] for k in store.list("soft_labels/")]
    assert "manifest.json" not in stored  # nothing that looks complete
    assert not [k for k in stored if k.startswith(killed)]  # no part of the killed shard
    total = len(stored) + failed

    switch.unlink()
    again = _label(settings, teacher, small_dataset, CFG)
    assert len(again.manifest["shards"]) == total
    assert again.manifest["reused_shards"] == len(stored)  # only the failed shards were labeled again
    generate_soft_labels(teacher, small_dataset, CFG, LocalStore(tmp_path / "alone"))
    _same_entry(store, LocalStore(tmp_path / "alone"), again.key)


def test_candidates_train_side_by_side_on_two_dask_workers_to_the_students_one_process_gives(
    prefect_server, registered_teacher, small_dataset, tracking_uri, tmp_path
):
    """train.parallel_candidates: the run's two candidates train at once, one a worker, each from the teacher the
    worker loaded (here the run's assistant, sent pickled); the students are the ones training them one after the
    other at one thread gives, byte for byte, and the assistant is each one's first stage, once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    bags = [
        {"name": f"bag-{dim}", "family": "embedding_bag", "buckets": 2048, "dim": dim, "lr": 0.1} for dim in (8, 16)
    ]
    recipe = parse_recipe(
        {**one_student_recipe(registered_teacher[0], "student-side-by-side"), "students": bags,
         "train": {"epochs": 2, "batch_size": 32, "eval_every": 5, "parallel_candidates": True},
         "stages": {"assistants": [{**bags[1], "name": "assistant", "dim": 32}]}}
    )  # fmt: skip
    teacher = load_teacher(*registered_teacher, tracking_uri)  # the workers load it from the registry
    labels = generate_soft_labels(teacher, small_dataset, recipe.soft_labels, LocalStore(tmp_path / "store"))
    settings = _settings(tmp_path, tracking_uri)

    @task
    def distill_candidates():  # as in the pipeline: inside a task of the run's flow
        return distill_all(recipe, small_dataset, labels, teacher, tmp_path / "side-by-side", settings=settings)

    side_by_side = flow(name="run")(lambda: distill_candidates())()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's thread count
    try:
        alone = distill_all(recipe, small_dataset, labels, teacher, tmp_path / "alone", settings=None)
    finally:
        torch.set_num_threads(threads)

    assert [o.config.name for o in side_by_side] == [o.config.name for o in alone] == ["bag-8", "bag-16"]
    for mine, theirs in zip(side_by_side, alone, strict=True):
        assert mine.distilled.history == theirs.distilled.history
        weights, expected = mine.distilled.student.state_dict(), theirs.distilled.student.state_dict()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), mine.config.name
    assistant = side_by_side[0].stages[0]
    assert [[s.name for s in o.stages] for o in side_by_side] == [["assistant"]] * 2
    assert side_by_side[1].stages[0] is assistant and "Dask worker" not in assistant.result.trained_on  # the run's
    where = [o.distilled.trained_on for o in side_by_side]
    assert all(w.startswith("cpu, 1 thread, Dask worker tcp://") for w in where) and len(set(where)) == 2, where
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["train bag-8", "train bag-16"]))
        )
    assert len(runs) == 2 and {r.state.type.value for r in runs} == {"COMPLETED"}
    assert max(r.start_time for r in runs) < min(r.end_time for r in runs), "the candidates did not train at once"


def test_workers_that_run_tasks_in_threads_are_refused_by_name(prefect_server, small_dataset, tracking_uri, tmp_path):
    """Two tasks in threads of one worker would share torch's process-wide state: such a cluster is refused."""
    from distributed import LocalCluster

    module = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=small_dataset.labels)
    teacher = LoadedTeacher(module, "toy", "here", content_digest(module))
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster:
        settings = dataclasses.replace(_settings(tmp_path, tracking_uri), dask=cluster.scheduler_address)
        with pytest.raises(DistillError, match=r"run several tasks at once in threads: .*--nthreads 1"):
            _label(settings, teacher, small_dataset, CFG)
    assert not LocalStore(settings.store_uri).list("soft_labels/")


def test_a_remote_scheduler_without_a_prefect_server_is_refused_before_any_work(tracking_uri, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = dataclasses.replace(_settings(tmp_path, tracking_uri), dask="tcp://127.0.0.1:8786")
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(DistillError, match="needs a Prefect server .* set PREFECT_API_URL"),
    ):
        shard_runner(settings, None, CFG, "classification", "store")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        ({"DISTILL_DASK": "yes"}, "DISTILL_DASK='yes': set it to 'local'"),
        ({"DISTILL_DASK_ADDRESS": "host:8786"}, "must be a scheduler address like tcp://host:8786"),
        ({"DISTILL_DASK": "local", "DISTILL_DASK_WORKERS": "0"}, "DISTILL_DASK_WORKERS='0' must be a whole number"),
    ],
)
def test_bad_dask_settings_are_refused_by_name(variables, error, tmp_path, monkeypatch):
    from distill_core.settings import load_settings

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistillError, match=error):
        load_settings(tmp_path)


# --- data-parallel training under torchrun ------------------------------------------------------------------------

BAG = StudentConfig(name="bag", family="embedding_bag", buckets=4096, dim=16, lr=0.02)
# The soft targets alone: every term averaged over all of a batch's rows sums exactly over the processes' shares.
# (`ce` averages over the labelled rows only, and a transfer set with augmented copies has unlabelled ones: each
# process averages over its own labelled rows, as DDP does, which moves the loss by their spread between shares.)
KD = [LossTerm(function="forward_kl", weight=1.0)]


@pytest.fixture(scope="module")
def transfer_set(registered_teacher, small_dataset, tracking_uri, tmp_path_factory):
    teacher = load_teacher(*registered_teacher, tracking_uri)
    labels = generate_soft_labels(teacher, small_dataset, CFG, LocalStore(tmp_path_factory.mktemp("store")))
    frame, val = small_dataset.split("transfer"), small_dataset.split("validation")
    transfer = TransferSet(frame["text"].tolist(), frame["label"].to_numpy(), labels.signal["transfer"])
    return teacher, transfer, (val["text"].tolist(), val["label"].to_numpy())


def _train(transfer_set, cfg, folder, nproc=None):
    teacher, transfer, val = transfer_set
    torch.manual_seed(0)
    student = build_student(BAG, teacher.module, ("fresh", "rotten"), transfer.texts, 64)
    if nproc is not None:
        cfg = cfg.model_copy(update={"distributed": DistributedConfig(nproc=nproc)})
    return train_student(student, BAG, cfg, transfer, val, folder, fingerprint="ddp-test", log=lambda _: None)


def _same_curve(one, other, tolerance=1e-5):
    assert [h["step"] for h in one.history] == [h["step"] for h in other.history]
    for mine, theirs in zip(one.history, other.history, strict=True):
        assert mine["val_accuracy"] == theirs["val_accuracy"], (mine, theirs)
        assert abs(mine["loss"] - theirs["loss"]) <= tolerance * max(1.0, abs(theirs["loss"])), (mine, theirs)
    a, b = one.student.state_dict(), other.student.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= tolerance


def _step(checkpoint):
    return torch.load(checkpoint, weights_only=False)["step"]


def test_two_process_ddp_matches_one_process_training(transfer_set, tmp_path):
    cfg = TrainConfig(losses=KD, epochs=3, batch_size=32, eval_every=4, patience=100)
    alone = _train(transfer_set, cfg, tmp_path / "alone")
    ddp = _train(transfer_set, cfg, tmp_path / "ddp", nproc=2)
    assert ddp.steps == alone.steps and len(ddp.history) > 3
    _same_curve(ddp, alone)
    assert ddp.trained_on.startswith("2 processes × cpu, ") and alone.trained_on.startswith("cpu, ")


def test_a_ddp_run_killed_mid_training_resumes_at_another_world_size(transfer_set, tmp_path):
    cfg = TrainConfig(losses=KD, epochs=40, batch_size=32, eval_every=10, checkpoint_every=10, patience=1000)
    alone = _train(transfer_set, cfg, tmp_path / "alone")
    checkpoint = tmp_path / "ddp" / "last.pt"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_train, transfer_set, cfg, tmp_path / "ddp", 2)
        wait_for(
            lambda: checkpoint.exists() and torch.load(checkpoint, weights_only=False)["step"] >= 30,
            120,
            "a checkpoint",
        )
        launcher = next(
            p for p in psutil.Process().children(recursive=True) if "torch.distributed.run" in " ".join(p.cmdline())
        )
        for process in [launcher, *launcher.children(recursive=True)]:
            process.kill()  # the whole torchrun tree, as a lost node or an OOM kill would
        with pytest.raises(DistributedTrainingError, match="its checkpoint .* resumes a rerun"):
            running.result(timeout=60)
    killed_at = _step(checkpoint)
    assert 30 <= killed_at < alone.steps
    resumed = _train(transfer_set, cfg, tmp_path / "ddp")  # one process now
    assert resumed.resumed_from == killed_at and resumed.steps == alone.steps
    _same_curve(resumed, alone)


def test_a_search_trial_with_its_pruner_hook_trains_in_this_process(transfer_set, tmp_path):
    teacher, transfer, val = transfer_set
    cfg = TrainConfig(losses=KD, max_steps=4, batch_size=32, eval_every=2, distributed=DistributedConfig(nproc=2))
    seen, said = [], []
    student = build_student(BAG, teacher.module, ("fresh", "rotten"), transfer.texts, 64)
    result = train_student(
        student, BAG, cfg, transfer, val, tmp_path, fingerprint="t", log=said.append, on_eval=lambda *e: seen.append(e)
    )
    assert result.steps == 4 and [step for step, _ in seen] == [2, 4]
    assert "bag: trained in this process (train.distributed takes no step or evaluation hook)" in said
