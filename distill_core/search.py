"""Choosing the smallest student that meets the gates: a search over student architectures.

1. Every architecture of the recipe's space (and every listed student) is built untrained and measured: size, and
   batch-1 latency on this machine with the project's one latency function. Both depend on the architecture only,
   so they are cached per architecture and machine. Those that cannot meet the gates' size, parameter and latency
   bounds are dropped: they are never trained.
2. The rest are trials of one Optuna study (its storage: DISTILL_SEARCH_URI, by default the ledger's database),
   queued smallest first and trained by successive halving over steps (SuccessiveHalvingPruner on the validation
   metric each evaluation reports): a larger architecture goes on training only while it keeps up with the
   smaller ones tried before it.
3. The candidate is the smallest trained architecture whose validation quality meets the gates' quality bound (then
   the best of equal size); with none, the best one, which the gates then reject.

A killed search resumes: finished trials are in the study; a trial that was running when its process died is
marked failed and its architecture tried again (its training resumes from its checkpoint). One search per study
runs at a time: in the flow, the ledger's claim on the teacher version makes it so.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from distill_core.errors import DistillError
from distill_core.files import write_json
from distill_core.gates import exceeded, size_and_latency
from distill_core.modules import TextModule
from distill_core.recipe import Recipe, StudentConfig
from distill_core.tasks import Task

SEARCH_FILE = "search.json"  # what the search measured, tried and chose; in the run folder and the students folder
ARCHITECTURE = "architecture"  # the one parameter of every trial: an architecture's name
Log = Callable[[str], None]
# Train one architecture by distillation, calling on_eval(step, validation value) after every evaluation (which may
# raise optuna.TrialPruned to stop it); returns the steps trained and the best validation value.
Train = Callable[[StudentConfig, Callable[[int, float], None]], tuple[int, float]]


@dataclass
class Architecture:
    """A student architecture as measured before training, and whether it can meet the gates."""

    config: StudentConfig
    params: int
    bytes: int
    p50_ms: float
    p95_ms: float
    problems: list[str] = field(default_factory=list)  # why it cannot meet the gates' size or latency bounds

    @property
    def feasible(self) -> bool:
        return not self.problems


def architecture_key(task: Task, cfg: StudentConfig, source: TextModule, data_digest: str) -> str:
    """What decides an architecture's size and latency: its settings (not its name or lr), the shapes of what it is
    cut from, the data (a pruned vocabulary is the words seen there) and the machine it runs on."""
    settings = cfg.model_dump(mode="json", exclude={"name", "lr"})
    shapes = sorted((k, list(v.shape)) for k, v in source.state_dict().items())
    machine = [platform.node(), platform.machine(), os.cpu_count(), torch.get_num_threads()]
    blob = json.dumps([task.name, settings, shapes, data_digest, machine], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


MEASURE_GROUP = 8  # architectures built and timed side by side at once


def measure(
    recipe: Recipe,
    task: Task,
    build: Callable[[StudentConfig], TextModule],
    source: TextModule,
    data_digest: str,
    inputs: Sequence[Any],
    cache_file: Path,
    teacher_params: int,
    log: Log = print,
) -> list[Architecture]:
    """Every candidate architecture measured (size, and latency side by side with its group of MEASURE_GROUP), from
    the cache where it holds one; each checked against the gates' size and latency bounds."""
    from distill_core.evaluate import size_of

    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    keys = {cfg.name: architecture_key(task, cfg, source, data_digest) for cfg in recipe.candidates}
    todo = [cfg for cfg in recipe.candidates if keys[cfg.name] not in cache]
    if todo:
        log(f"search: measuring {len(todo)} architecture(s) before training ({len(keys) - len(todo)} cached)")
    for start in range(0, len(todo), MEASURE_GROUP):  # a group's models in memory at once, not the whole space's
        group = todo[start : start + MEASURE_GROUP]
        models = {cfg.name: build(cfg) for cfg in group}
        speeds = task.measure_speed(models, inputs, recipe.evaluation)
        for cfg in group:
            size = size_of(models[cfg.name])
            cache[keys[cfg.name]] = {
                "params": size["params"], "bytes": size["bytes"],
                "p50_ms": speeds[cfg.name].p50_ms, "p95_ms": speeds[cfg.name].p95_ms,
            }  # fmt: skip
        del models
        write_json(cache_file, cache)  # after each group: a measurement cut short keeps what it measured
    measured = []
    for cfg in recipe.candidates:
        arch = Architecture(cfg, **cache[keys[cfg.name]])
        bounds = size_and_latency(arch.params, arch.bytes, arch.p95_ms, teacher_params, recipe.gates)
        arch.problems = exceeded(bounds)
        measured.append(arch)
    return measured


def _study(recipe: Recipe, storage: str, name: str, task: Task) -> optuna.Study:
    """The search's study: its trials come from a queue (smallest first), so the sampler only breaks ties of a
    duplicate; the pruner is successive halving over the training steps each evaluation reports."""
    cfg = recipe.search
    assert cfg is not None
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_steps, reduction_factor=cfg.reduction_factor)
    return optuna.create_study(
        study_name=name,
        storage=optuna.storages.RDBStorage(storage),
        sampler=optuna.samplers.RandomSampler(seed=recipe.train.seed),
        direction="maximize" if task.maximize else "minimize",
        pruner=pruner,
        load_if_exists=True,
    )


def _queue(study: optuna.Study, order: list[str], log: Log) -> int:
    """Queue every architecture of `order` (smallest first) that has no finished trial and is not queued: those not
    tried yet, and those whose trial failed or was left running by a process that died (their training resumes
    from its checkpoint). Returns how many trials are queued."""
    states = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # one search per study at a time
        study._storage.set_trial_state_values(trial._trial_id, states.FAIL)
        log(f"search: trial {trial.number} ({trial.params.get(ARCHITECTURE)}) was cut short: trying it again")
    trials = study.get_trials(deepcopy=False)
    finished = {t.params.get(ARCHITECTURE) for t in trials if t.state in (states.COMPLETE, states.PRUNED)}
    queued = [t.system_attrs.get("fixed_params", {}).get(ARCHITECTURE) for t in trials if t.state == states.WAITING]
    for name in order:
        if name not in finished and name not in queued:
            study.enqueue_trial({ARCHITECTURE: name}, skip_if_exists=False)
            queued.append(name)
    return len(queued)


@dataclass
class SearchResult:
    """What a search measured, tried and chose: one row per architecture (its measurements, and its trial)."""

    chosen: str
    rows: list[dict[str, Any]]
    quality_name: str  # the validation metric the trials report (val_accuracy, val_perplexity)
    seconds: float = 0.0
    study: str = ""
    teacher_score: float | None = None  # the teacher's validation metric, which the quality gate compares against

    @property
    def trials(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("state")]

    def chosen_config(self) -> StudentConfig:
        row = next(r for r in self.rows if r["name"] == self.chosen)
        return StudentConfig.model_validate(row["config"])

    def summary(self) -> dict[str, Any]:
        states = [r["state"] for r in self.trials]
        return {
            "architectures": len(self.rows),
            "infeasible": sum(not r["feasible"] for r in self.rows),
            "trials": len(states),
            "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"),
            "seconds": round(self.seconds, 1),
            "chosen": self.chosen,
        }

    def markdown(self) -> str:
        """The frontier table: every architecture, smallest first, with what it cost and reached."""
        lines = [
            f"| architecture | params | MB | p95 ms | {self.quality_name} | quality bound | trial | steps | frontier |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            trained = r.get("score") is not None
            score = f"{r['score']:.4f}" if trained else "—"
            bound = r.get("quality_problem") or ("met" if trained else "—")
            state = r.get("state") or untried(r)
            lines.append(
                f"| {r['name']}{' (chosen)' if r['name'] == self.chosen else ''} | {r['params']:,} | "
                f"{r['bytes'] / 1e6:.2f} | {r['p95_ms']:.2f} | {score} | {bound} | {state} | {r.get('steps', 0)} | "
                f"{'yes' if r.get('frontier') else ''} |"
            )
        s = self.summary()
        lines += [
            "",
            f"{s['architectures']} architectures, {s['infeasible']} dropped before training; {s['trials']} trials "
            f"({s['complete']} complete, {s['pruned']} pruned) in {s['seconds']:.0f} s.",
        ]
        return "\n".join(lines)

    def save(self, folder: Path) -> Path:
        write_json(folder / SEARCH_FILE, asdict(self))
        return folder / SEARCH_FILE

    @classmethod
    def load(cls, folder: Path) -> SearchResult | None:
        path = folder / SEARCH_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def untried(row: dict[str, Any]) -> str:
    """Why an architecture has no trial: the gates it cannot meet, or the trial budget (search.trials) ran out
    before it (the smaller ones go first)."""
    if row["problems"]:
        return f"not trained: {'; '.join(row['problems'])}"
    return "not trained: beyond search.trials (the smaller ones go first)"


def pareto_frontier(rows: list[dict[str, Any]], maximize: bool) -> set[str]:
    """The trained architectures no other one beats on size, latency and quality at once."""
    trained = [r for r in rows if r.get("score") is not None]

    def better_or_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
        quality = a["score"] >= b["score"] if maximize else a["score"] <= b["score"]
        return a["params"] <= b["params"] and a["p95_ms"] <= b["p95_ms"] and quality

    return {
        r["name"]
        for r in trained
        if not any(better_or_equal(o, r) and not better_or_equal(r, o) for o in trained if o is not r)
    }


def search(
    recipe: Recipe,
    task: Task,
    architectures: list[Architecture],
    train: Train,
    teacher_score: float,
    storage: str,
    study_name: str,
    log: Log = print,
) -> SearchResult:
    """Train the feasible architectures as trials of one study (resuming it) and choose the candidate."""
    cfg = recipe.search
    assert cfg is not None
    started = time.perf_counter()
    feasible = sorted((a for a in architectures if a.feasible), key=lambda a: (a.params, a.config.name))
    for arch in architectures:
        if not arch.feasible:
            log(f"search: {arch.config.name} is never trained: {'; '.join(arch.problems)}")
    if not feasible:
        raise NoFeasibleArchitecture(architectures, task.early_stopping)
    by_name = {a.config.name: a for a in feasible}
    study = _study(recipe, storage, study_name, task)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    remaining = _queue(study, list(by_name)[: cfg.trials], log)
    if finished:
        log(f"search: study {study_name} has {len(finished)} finished trial(s): {remaining} to go")

    def objective(trial: optuna.Trial) -> float:
        arch = by_name[trial.suggest_categorical(ARCHITECTURE, list(by_name))]
        trial.set_user_attr("params", arch.params)

        def on_eval(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr("steps", step)
                raise optuna.TrialPruned(f"{arch.config.name}: {value:.4f} at step {step} is not among the best")

        log(f"search: trial {trial.number}: {arch.config.name} ({arch.params:,} parameters)")
        steps, best = train(arch.config, on_eval)
        trial.set_user_attr("steps", steps)
        return best

    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, catch=())
    rows = _rows(task, recipe, architectures, study, teacher_score)
    chosen = _choose(rows, task.maximize)
    for row in rows:
        row["chosen"] = row["name"] == chosen
    result = SearchResult(chosen, rows, task.early_stopping, time.perf_counter() - started, study_name, teacher_score)
    log(f"search: chose {chosen} of {len(rows)} architectures ({result.summary()})")
    return result


def _rows(
    task: Task, recipe: Recipe, architectures: list[Architecture], study: optuna.Study, teacher_score: float
) -> list[dict[str, Any]]:
    trials: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in ("COMPLETE", "PRUNED"):
            trials[trial.params[ARCHITECTURE]] = trial  # the last finished trial of each architecture
    rows = measured_rows(architectures)
    for row in rows:
        finished = trials.get(row["name"])
        if finished is not None:
            values = finished.intermediate_values
            score = finished.value if finished.state.name == "COMPLETE" else values[max(values)] if values else None
            row.update(
                trial=finished.number,
                state=finished.state.name,
                steps=int(finished.user_attrs.get("steps", max(values, default=0))),
                score=score,
                history={str(k): v for k, v in sorted(values.items())},
                seconds=(finished.datetime_complete - finished.datetime_start).total_seconds()
                if finished.datetime_complete and finished.datetime_start
                else None,
            )
            if score is not None:
                row["quality_problem"] = task.quality_problem(score, teacher_score, recipe.gates)
    frontier = pareto_frontier(rows, task.maximize)
    for row in rows:
        row["frontier"] = row["name"] in frontier
    return rows


def measured_rows(architectures: list[Architecture]) -> list[dict[str, Any]]:
    """One row per architecture, smallest first: what was measured before training, and what the gates say."""
    return [
        {
            "name": arch.config.name,
            "config": arch.config.model_dump(mode="json"),
            "params": arch.params,
            "bytes": arch.bytes,
            "p50_ms": arch.p50_ms,
            "p95_ms": arch.p95_ms,
            "feasible": arch.feasible,
            "problems": arch.problems,
        }
        for arch in sorted(architectures, key=lambda a: (a.params, a.config.name))
    ]


def _choose(rows: list[dict[str, Any]], maximize: bool) -> str:
    """The smallest completely trained architecture meeting the quality bound (ties: the better score); with none,
    the best completely trained one."""
    complete = [r for r in rows if r.get("state") == "COMPLETE"]
    if not complete:  # the first trial is never pruned: only failed trials leave none
        raise DistillError("the search has no completely trained architecture: its trials failed (see the log)")
    sign = -1 if maximize else 1
    meeting = [r for r in complete if r.get("quality_problem") is None]
    if meeting:
        return min(meeting, key=lambda r: (r["params"], sign * r["score"]))["name"]
    return min(complete, key=lambda r: sign * r["score"])["name"]


class NoFeasibleArchitecture(DistillError):
    """No architecture of the search can meet the gates' size and latency bounds: nothing was trained."""

    def __init__(self, architectures: list[Architecture], quality_name: str = "") -> None:
        self.architectures = architectures
        self.table = SearchResult("", measured_rows(architectures), quality_name)
        closest = min(architectures, key=lambda a: (len(a.problems), a.params))
        super().__init__(
            f"no student architecture of the {len(architectures)} searched can meet the gates: the closest, "
            f"{closest.config.name} ({closest.params:,} parameters, {closest.bytes / 1e6:.2f} MB, p95 "
            f"{closest.p95_ms:.2f} ms), has {'; '.join(closest.problems)}. Widen the gates or add smaller "
            "architectures to search"
        )
