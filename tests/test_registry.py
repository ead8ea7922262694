"""The registry as the pipeline sees it: an atomic claim, alias moves with a history, moves from outside noticed."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
from mlflow.tracking import MlflowClient
from toy_models import BagTeacher, WordHashTokenizer

from distill_core.evaluate import Report
from distill_core.gates import Verdict, beats, choose, judge
from distill_core.recipe import GateConfig
from distill_core.registry import (
    CHAMPION,
    OUTSIDE,
    PREVIOUS,
    Ledger,
    RegistryError,
    aliases,
    champion_set_by_hand,
    promote,
    rollback,
    unhandled_versions,
)
from distill_core.teachers import WrappedTeacher, log_teacher


def _claim(url: str, who: str, out) -> None:
    out.put((who, Ledger(url).claim("teacher", "7", who)))


def test_claim_is_won_by_exactly_one_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url)  # create the tables once, as the first process of a deployment would
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(url, f"p{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = dict(out.get(timeout=5) for _ in procs)
    assert sum(results.values()) == 1
    winner = next(who for who, won in results.items() if won)
    assert Ledger(url).claimed("teacher") == {"7": winner}


def _student_versions(client: MlflowClient, name: str, count: int) -> list[str]:
    """Register `count` versions of a tiny module under `name` (aliases need real versions)."""
    teacher = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=("a", "b"))
    return [log_teacher(teacher, name, client.tracking_uri)[1] for _ in range(count)]


@pytest.fixture
def registry(tmp_path, tracking_uri):
    client = MlflowClient(tracking_uri)
    name = f"student-{uuid.uuid4().hex[:8]}"
    return client, Ledger(f"sqlite:///{tmp_path / 'ledger.db'}"), name, _student_versions(client, name, 3)


def test_promote_and_rollback_record_every_move(registry):
    client, ledger, name, (v1, v2, v3) = registry
    promote(client, ledger, name, v1, "pipeline", "first")
    promote(client, ledger, name, v2, "pipeline", "better")
    assert aliases(client, name) == {CHAMPION: v2, PREVIOUS: v1}
    assert rollback(client, ledger, name, "person:ana") == v1
    assert aliases(client, name) == {CHAMPION: v1, PREVIOUS: v2}
    champion_moves = [(m["from_version"], m["version"], m["actor"]) for m in ledger.alias_history(name, CHAMPION)]
    assert champion_moves == [(None, v1, "pipeline"), (v1, v2, "pipeline"), (v2, v1, "person:ana")]
    assert client.get_model_version(name, v1).tags["distill.champion_by"] == "person:ana"
    with pytest.raises(RegistryError, match="has no version 99"):
        promote(client, ledger, name, "99", "pipeline", "typo")


def test_rollback_without_previous_is_a_clear_error(registry):
    client, ledger, name, (v1, *_) = registry
    promote(client, ledger, name, v1, "pipeline", "first")
    with pytest.raises(RegistryError, match="no 'previous' version"):
        rollback(client, ledger, name, "person:ana")


def test_alias_moved_in_the_ui_is_noticed_and_counts_as_by_hand(registry):
    client, ledger, name, (v1, v2, _) = registry
    promote(client, ledger, name, v1, "pipeline", "first")
    assert not champion_set_by_hand(client, ledger, name)
    client.set_registered_model_alias(name, CHAMPION, v2)  # what the MLflow UI does
    assert champion_set_by_hand(client, ledger, name)
    last = ledger.alias_history(name, CHAMPION)[-1]
    assert (last["from_version"], last["version"], last["actor"]) == (v1, v2, OUTSIDE)


def test_unhandled_versions_skip_claimed_and_ledgered_ones(registry, tmp_path):
    client, ledger, name, (v1, v2, v3) = registry
    ledger.claim(name, v1, "someone")
    client.set_model_version_tag(name, v2, "distill.status", "failed")
    assert unhandled_versions(client, ledger, name) == [v3]


def _report(name: str, accuracy: float, params: int, p95: float = 1.0) -> Report:
    return Report(name, accuracy, accuracy, 0.9, 0.1, 0.05, p95 / 2, p95, 100.0, params, params * 4)


def test_gates_name_every_failed_threshold_and_the_smallest_passing_wins():
    teacher = _report("teacher", 0.80, 1_000_000, 10)
    gates = GateConfig(min_accuracy=0.7, min_retention=0.9, max_p95_ms=5, max_param_ratio=0.5, max_regression=0.01)
    slow = judge("slow", _report("slow", 0.79, 100_000, 8), teacher, gates, champion=None)
    assert slow.reasons == ["p95 latency ms 8 > 5"]
    weak = judge("weak", _report("weak", 0.60, 10_000), teacher, gates, champion=None)
    assert weak.reasons[0].startswith("accuracy 0.6000 < 0.7000") and len(weak.reasons) == 2
    regress = judge("r", _report("r", 0.75, 10_000), teacher, gates, champion=_report("c", 0.78, 10_000))
    assert "regresses from the champion's 0.7800" in regress.reasons[-1]
    small = judge("small", _report("small", 0.77, 50_000), teacher, gates, None)
    big = judge("big", _report("big", 0.79, 200_000), teacher, gates, None)
    assert choose([big, small, slow]).candidate == "small"
    assert choose([weak, slow]).candidate == "slow"  # nothing passed: the most accurate failure
    assert beats(small.report, None) and not beats(small.report, _report("c", 0.77, 1))
    assert isinstance(small, Verdict) and small.passed
