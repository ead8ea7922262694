"""The registry as the pipeline sees it: an atomic claim, alias moves with a history, moves from outside noticed."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
from mlflow.tracking import MlflowClient
from toy_models import BagTeacher, WordHashTokenizer

from distill_core.evaluate import Report
from distill_core.gates import Verdict, beats, choose, judge
from distill_core.model_io import log_teacher
from distill_core.modules import WrappedTeacher
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
    reconcile,
    rollback,
    set_ledger,
    unhandled_versions,
    upgrade_ledger,
)


def _claim(url: str, who: str, out) -> None:
    out.put((who, Ledger(url).claim("teacher", "7", "student", who)))


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
    assert Ledger(url).claimed("teacher", "student") == {"7": winner}


def test_two_student_models_of_one_teacher_each_claim_its_versions_once(tmp_path):
    """A CPU student and an edge student of the same teacher: neither blocks the other, each runs once."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert ledger.claim("teacher", "3", "cpu-student", "a") and ledger.claim("teacher", "3", "edge-student", "b")
    assert not ledger.claim("teacher", "3", "cpu-student", "c")
    assert ledger.claimed("teacher", "cpu-student") == {"3": "a"}
    assert ledger.claimed("teacher", "edge-student") == {"3": "b"}
    ledger.release("teacher", "3", "cpu-student")
    assert ledger.claimed("teacher", "cpu-student") == {} and ledger.claimed("teacher", "edge-student") == {"3": "b"}


def test_a_claim_records_who_holds_it_and_goes_stale_without_heartbeats(tmp_path, monkeypatch):
    import socket
    import time

    from distill_core import registry

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert ledger.claim("teacher", "1", "student", "cli@host:1")
    claim = ledger.claim_of("teacher", "1", "student")
    assert claim is not None and claim.host == socket.gethostname() and claim.pid > 0 and not claim.stale()
    later = time.time() + registry.STALE_AFTER_S + 1
    assert claim.stale(now=later) and "STALE" in claim.describe(now=later)
    with ledger.heartbeat("teacher", "1", "student", interval_s=0.05):
        time.sleep(0.3)
    beaten = ledger.claim_of("teacher", "1", "student")
    assert beaten is not None and beaten.heartbeat_at > claim.heartbeat_at


def test_a_ledger_database_of_the_previous_release_keeps_its_claims(tmp_path, tracking_uri):
    """Claims taken before claims were per student model (table distill_claims) still hold their versions."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the previous release's schema and one claim in it, as it wrote them
        conn.execute(sa.text("CREATE TABLE distill_claims (teacher_name VARCHAR(256) NOT NULL, teacher_version "
                             "VARCHAR(32) NOT NULL, claimed_by VARCHAR(256) NOT NULL, claimed_at FLOAT NOT NULL, "
                             "PRIMARY KEY (teacher_name, teacher_version))"))  # fmt: skip
        conn.execute(sa.text("INSERT INTO distill_claims VALUES ('teacher', '4', 'watcher@old:12', 1.0)"))
    ledger = Ledger(url)
    upgrade_ledger(MlflowClient(tracking_uri), ledger)  # no such teacher in the registry: it holds for everyone
    assert ledger.claimed("teacher", "any-student") == {"4": "watcher@old:12"}
    assert not ledger.claim("teacher", "4", "any-student", "new")
    stale = ledger.claim_of("teacher", "4", "any-student")
    assert stale is not None and stale.stale()  # no heartbeat was ever recorded: --rerun --force may take it


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
    ledger.claim(name, v1, "student", "someone")
    set_ledger(client, name, v2, "student", "failed", error="boom")
    assert unhandled_versions(client, ledger, name, "student") == [v3]
    assert unhandled_versions(client, ledger, name, "another-student") == [v1, v2, v3]


def test_a_student_that_failed_its_gates_is_not_made_champion_without_force(registry):
    client, ledger, name, (v1, v2, _) = registry
    client.set_model_version_tag(name, v2, "distill.gate", "failed")
    client.set_model_version_tag(name, v2, "distill.gate_reasons", "accuracy 0.5100 < 0.7000")
    promote(client, ledger, name, v1, "pipeline", "first")
    with pytest.raises(RegistryError, match=r"failed its gates \(accuracy 0.5100 < 0.7000\).*--force"):
        promote(client, ledger, name, v2, "person:ana", "promoted by hand")
    assert aliases(client, name) == {CHAMPION: v1}
    promote(client, ledger, name, v2, "person:ana", "the gate is wrong for this data", force=True)
    assert aliases(client, name)[CHAMPION] == v2
    last = ledger.alias_history(name, CHAMPION)[-1]
    assert last["actor"] == "person:ana" and last["reason"].startswith("FORCED although it failed its gates")
    assert last["reason"].endswith("the gate is wrong for this data")


def test_a_failed_student_made_champion_in_the_ui_is_recorded_as_a_forced_move(registry):
    client, ledger, name, (v1, v2, _) = registry
    client.set_model_version_tag(name, v2, "distill.gate", "failed")
    promote(client, ledger, name, v1, "pipeline", "first")
    client.set_registered_model_alias(name, CHAMPION, v2)  # a person, in the MLflow UI
    reconcile(client, ledger, name)
    last = ledger.alias_history(name, CHAMPION)[-1]
    assert (last["version"], last["actor"]) == (v2, OUTSIDE) and "FORCED move of a student that failed" in last[
        "reason"
    ]


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


def test_a_student_still_at_chance_did_not_learn_and_a_student_beating_its_teacher_is_noted():
    from distill_core.promotion import judge_all
    from distill_core.recipe import parse_recipe
    from distill_core.steps import StudentOutcome
    from distill_core.train import TrainResult

    recipe = parse_recipe({"name": "r", "students": [{"name": "stuck", "family": "embedding_bag"},
                                                    {"name": "better", "family": "embedding_bag"}]})  # fmt: skip
    teacher = _report("teacher", 0.60, 1_000_000)
    stuck = StudentOutcome(recipe.students[0], TrainResult(None), None, train_score=0.52, chance_score=0.52)  # type: ignore[arg-type]
    better = StudentOutcome(recipe.students[1], TrainResult(None), None, train_score=0.9, chance_score=0.52)  # type: ignore[arg-type]
    stuck.reports["distilled"] = _report("stuck", 0.58, 10_000)
    better.reports["distilled"] = _report("better", 0.75, 20_000)
    better.reports["distilled"].retention = 0.75 / 0.60
    decision = judge_all(recipe, [stuck, better], teacher, None, None)
    assert decision.verdicts[0].reasons == [
        "did not learn: train-split accuracy 0.520 is at chance (0.520, the largest class's share); "
        "raise students[].lr or train.epochs"
    ]
    assert decision.chosen.candidate == "better" and decision.verdicts[1].passed
    assert any(note.startswith("better beats its teacher (125.0%") for note in decision.notes)
