"""The student search on the real MiniLM teacher and Rotten Tomatoes reviews: architectures measured before
training, infeasible ones never trained, successive halving in an Optuna study kept in SQLite, the same choice for
the same seed, and a killed search that resumes without training its finished trials again."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from distill_core import steps
from distill_core.model_io import load_teacher
from distill_core.recipe import parse_recipe
from distill_core.search import SEARCH_FILE, SearchResult
from distill_core.settings import load_settings
from distill_core.soft_labels import generate_soft_labels
from distill_core.store import LocalStore

SPACE = {
    "transformer": {"teacher_layers": [[0], [0, 1]], "embedding_dim": [32], "heads": [6, None], "lr": 3e-4},
    "embedding_bag": {"buckets": [4096], "dim": [8, 16], "lr": 0.05},
    "trials": 6,
    "min_steps": 5,
    "reduction_factor": 2,
}
TOO_BIG = 3_000_000  # parameters: the 2-layer transformers are above it, everything else below


def _recipe(**fields):
    return parse_recipe(
        {
            "name": "search",
            "data": {"max_rows": 300, "augment_copies": 1},
            "search": SPACE,
            "gates": {"max_params": TOO_BIG, "max_param_ratio": None, "min_retention": 0.5},
            "train": {"max_steps": 15, "batch_size": 16, "eval_every": 5, "checkpoint_every": 5},
            "evaluation": {"latency_samples": 5, "throughput_batch": 8, "hard_label_baseline": False},
            **fields,
        }
    )


@pytest.fixture
def searching(registered_teacher, tracking_uri, small_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_SEARCH_URI", raising=False)
    monkeypatch.delenv("DISTILL_LEDGER_URI", raising=False)
    teacher = load_teacher(*registered_teacher, tracking_uri)
    recipe = _recipe()
    labels = generate_soft_labels(teacher, small_dataset, recipe.soft_labels, LocalStore(tmp_path / "store"))

    def run(home: str, log=lambda _: None):  # noqa: ANN001, ANN202
        settings = load_settings(tmp_path / home)
        out = tmp_path / home / "run"
        outcomes = steps.distill_all(recipe, small_dataset, labels, teacher, out, log, settings=settings)
        return settings, out, outcomes

    return run


def _trials(settings) -> list[optuna.trial.FrozenTrial]:  # noqa: ANN001
    (summary,) = optuna.get_all_study_summaries(settings.search_storage)
    return optuna.load_study(study_name=summary.study_name, storage=settings.search_storage).get_trials()


def test_infeasible_architectures_are_never_trained_the_seed_decides_and_a_killed_search_resumes(searching):
    """One search end to end, then the same search killed in a trial and resumed in another home: the same choice,
    and the trials that had finished are not trained again."""
    settings, out, (outcome,) = searching("first")
    first = SearchResult.load(out)
    rows = {r["name"]: r for r in first.rows}
    too_big = [name for name, r in rows.items() if r["params"] > TOO_BIG]
    assert sorted(too_big) == ["L0-1-e32", "L0-1-h6-e32"]
    trained = {t.params["architecture"] for t in _trials(settings)}
    assert trained == set(rows) - set(too_big)  # every feasible architecture is a trial, no other
    for name in too_big:
        assert "state" not in rows[name] and rows[name]["problems"] == [
            f"parameters {rows[name]['params']:.4g} > 3e+06"
        ]
        assert not (out / name).exists()  # no checkpoint: it was never trained
    chosen = rows[first.chosen]
    assert chosen["state"] == "COMPLETE" and chosen["quality_problem"] is None
    meeting = [r for r in rows.values() if r.get("state") == "COMPLETE" and r["quality_problem"] is None]
    assert chosen["params"] == min(r["params"] for r in meeting)
    assert outcome.config.name == first.chosen and outcome.search.chosen == first.chosen
    # the chosen trial's training is the candidate's: distill_all reused it (same folder, same fingerprint)
    assert outcome.distilled.resumed_from == chosen["steps"]
    assert "(chosen)" in first.markdown() and "not trained: parameters" in first.markdown()
    # the measurements are cached per architecture, the trials kept in the study: again, nothing is redone
    said: list[str] = []
    searching("first", said.append)
    assert not [line for line in said if "measuring" in line]
    assert any(f"{len(trained)} finished trial(s): 0 to go" in line for line in said)

    said.clear()

    def killed_in_the_third_trial(line: str) -> None:
        said.append(line)
        if line.startswith("search: trial 2:"):
            killed_in_the_third_trial.armed = True  # type: ignore[attr-defined]
        if getattr(killed_in_the_third_trial, "armed", False) and line.startswith("step 10/"):
            raise SystemExit("killed")  # leaves the trial RUNNING in the study, as a SIGKILL would

    with pytest.raises(SystemExit):
        searching("second", killed_in_the_third_trial)
    states = [t.state.name for t in _trials(load_settings(out.parents[1] / "second"))]
    cut = len(states) - 1
    assert cut >= 2 and states[cut] == "RUNNING" and "RUNNING" not in states[:cut]  # the others had finished

    said.clear()
    _, second_out, _ = searching("second", said.append)
    second = SearchResult.load(second_out)
    assert second.chosen == first.chosen
    assert [(r["name"], r.get("state")) for r in second.rows] == [(r["name"], r.get("state")) for r in first.rows]
    trial_lines = [line for line in said if line.startswith("search: trial")]
    assert trial_lines[0].startswith(f"search: trial {cut} (") and "cut short: trying it again" in trial_lines[0]
    assert not any(line.startswith(f"search: trial {n}:") for n in range(cut) for line in said)  # not trained again
    assert "resumed from checkpoint at step 5" in said, said  # the cut trial went on from its checkpoint
    assert json.loads((second_out / SEARCH_FILE).read_text())["chosen"] == first.chosen


# --- through the flow (`distill run`): nested runs per trial, the frontier on the parent run, the ledger ---

BAGS = {"embedding_bag": {"buckets": [2048, 8192], "dim": [8, 16], "lr": 0.1}, "min_steps": 7, "reduction_factor": 2}


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow_run(env, small_dataset, **overrides):  # noqa: ANN001, ANN202
    from test_pipeline import write_recipe
    from toy_models import register_toy_teacher

    from flows.distill import distill_teacher_version

    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, students=[], search=BAGS, train={"epochs": 4, "eval_every": 7}, **overrides)
    return version, distill_teacher_version(env["teacher"], version, recipe, env["home"])


def test_a_searched_run_logs_a_nested_run_per_trial_and_the_frontier_and_says_what_it_chose(
    prefect_server, env, small_dataset
):
    from mlflow.tracking import MlflowClient
    from test_pipeline import ledger_of

    version, result = _flow_run(env, small_dataset, gates={"max_param_ratio": None})
    entry = ledger_of(env, version)
    assert result["status"] == "succeeded", (entry["reasons"], entry.get("search"))
    client = MlflowClient(env["tracking_uri"])
    parent = client.get_run(entry["run_id"])
    chosen = parent.data.params["search_chosen"]
    assert entry["search"].startswith(f"chose {chosen} of 4 architectures: 0 dropped before training, 4 trials")
    student = client.get_model_version_by_alias(env["student"], "champion")
    assert student.tags["distill.candidate"] == chosen
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and params.role = 'search trial'",
    )
    assert len(children) == 4 == int(parent.data.metrics["search.trials"])
    states = {r.data.tags["search.state"] for r in children}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert [r.data.tags["search.chosen"] for r in children].count("True") == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/frontier.md", "search/search.json"} <= artifacts
    frontier = client.download_artifacts(parent.info.run_id, "search/frontier.md", str(env["tmp"]))
    assert f"| {chosen} (chosen) |" in Path(frontier).read_text()
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/search_frontier.png" in plots


def test_a_search_no_architecture_of_which_can_meet_the_gates_ends_rejected_naming_why_and_trains_nothing(
    prefect_server, env, small_dataset
):
    from test_pipeline import ledger_of, versions

    version, result = _flow_run(env, small_dataset, gates={"max_params": 1000})
    assert result["status"] == "rejected"
    entry = ledger_of(env, version)
    assert entry["status"] == "rejected" and entry["student_alias"] == "none" and not entry.get("student_version")
    assert "no student architecture of the 4 searched can meet the gates" in entry["reasons"]
    assert "bag-b2048-d8-n2 (16,402 parameters" in entry["reasons"] and "parameters 1.64e+04 > 1000" in entry["reasons"]
    assert versions(env, env["student"]) == []  # nothing registered
    runs = Path(env["home"]) / "runs"
    assert not any(p.name == "last.pt" for p in runs.rglob("*"))  # nothing trained


def test_impossible_quality_ends_rejected_with_a_diagnosis_and_each_fitting_remedy_tried_as_a_nested_run(
    prefect_server, env, small_dataset
):
    from mlflow.tracking import MlflowClient
    from test_pipeline import ledger_of

    from distill_core.degradation import FITS

    remedies = ["larger", "augment", "longer"]
    version, result = _flow_run(
        env, small_dataset, gates={"max_param_ratio": None, "min_retention": 1.5},
        on_degradation={"remedies": remedies, "budget_s": 600},
    )  # fmt: skip
    assert result["status"] == "rejected"
    entry = ledger_of(env, version)
    kind = entry["diagnosis"].split(":")[0].replace(" ", "_")
    assert kind in ("did_not_learn", "capacity_gap", "data_gap")
    attempts = [part.split(":")[0] for part in entry["remedies"].split(" | ")]  # "augment (for data_gap)"
    tried = [a.split(" (for ")[0] for a in attempts]
    assert attempts[0] == f"{tried[0]} (for {kind})"  # the first remedy answers the run's own diagnosis
    for i, attempt in enumerate(attempts):  # each: the recipe's first untried remedy fitting the diagnosis before it
        remedy, fits = attempt.split(" (for ")
        assert remedy == next(r for r in remedies if r in FITS[fits.rstrip(")")] and r not in tried[:i])
    assert all(": rejected (" in part for part in entry["remedies"].split(" | "))
    assert "retention of teacher accuracy" in entry["reasons"]
    client = MlflowClient(env["tracking_uri"])
    parent = client.get_run(entry["run_id"])
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and params.role = 'remedy'",
        order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    assert [r.data.params["remedy"] for r in runs] == tried
    assert all(r.data.tags["distill.outcome"] == "rejected" for r in runs)
    assert "**Diagnosis:**" in parent.data.tags["mlflow.note.content"]
    from distill_core.settings import load_settings
    from distill_core.status import collect, render

    state = collect(load_settings(env["home"]), env["teacher"], env["student"])
    (line,) = state["teacher"]["versions"][0]["students"].values()
    assert line["diagnosis"] == entry["diagnosis"] and line["remedies"] == entry["remedies"]
    assert f"(diagnosis: {entry['diagnosis']})" in render(state)


def test_a_measurement_cut_short_keeps_the_groups_it_measured(
    registered_teacher, tracking_uri, small_dataset, tmp_path, monkeypatch
):
    """Architectures are built and timed a group at a time, and the cache is written after each group: a
    measurement that dies part way (here: out of memory building the third) keeps the first groups, and the next one
    measures only the rest."""
    from distill_core import search
    from distill_core.ensemble import cut_from
    from distill_core.tasks import task_of

    monkeypatch.setattr(search, "MEASURE_GROUP", 2)
    recipe = _recipe()
    task = task_of(recipe)
    source = cut_from(load_teacher(*registered_teacher, tracking_uri).module)
    transfer = task.examples(small_dataset, "transfer")[0]
    built: list[str] = []

    def build(cfg):  # noqa: ANN001, ANN202
        if len(built) == 2 and fail:
            raise MemoryError(f"no room for {cfg.name}")
        built.append(cfg.name)
        return task.build_student(cfg, source, small_dataset, transfer, recipe.soft_labels, lambda _: None)

    cache, inputs, said = tmp_path / "architectures.json", task.examples(small_dataset, "test")[0], []
    args = (recipe, task, build, source, small_dataset.digest, inputs, cache, 22_000_000)
    fail = True
    with pytest.raises(MemoryError):
        search.measure(*args)
    assert len(json.loads(cache.read_text())) == 2  # the first group, measured and kept
    fail = False
    measured = search.measure(*args, log=said.append)
    assert len(measured) == len(recipe.candidates) and len(json.loads(cache.read_text())) == len(recipe.candidates)
    assert "(2 cached)" in said[0] and len(built) == len(recipe.candidates)
