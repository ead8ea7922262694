"""The MLflow registry as the pipeline sees it: teacher versions and their ledger, student aliases and their history.

MLflow tags carry the contract people read in the UI (`distill.<student model>.status` on a teacher version, one
group per student model; lineage on a student version). What MLflow cannot do is kept in a small SQL ledger
(SQLite by default, PostgreSQL in production): an atomic claim with a heartbeat, so each (teacher version,
student model) is distilled once however many triggers fire; webhook deliveries seen; named locks; and the
history of alias moves, which the registry does not keep.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from distill_core import names
from distill_core.errors import DistillError

STATUSES = ("running", "succeeded", "rejected", "failed")
# The ledger of one student model on a teacher version: tags distill.<student model>.<field>.
LEDGER_FIELDS = (
    "status",
    "student_version",
    "student_alias",
    "run_id",
    "reasons",
    "error",
    "rerun_error",  # a rerun of a version that already had an outcome failed: the outcome stays, this says why
    "start",  # a recipe with warm_start: where its student started (the student version, or cold and why)
    "search",  # a recipe with search: what it chose among how many architectures, trials, pruned, seconds
    "diagnosis",  # a rejected run: why its candidate degraded (did not learn, capacity gap, data gap)
    "remedies",  # a rejected run with on_degradation remedies: the ladder tried, each attempt and its outcome
    "claimed_by",
    "updated_at",
)
LEGACY_ALIAS_FIELD = "alias"  # what releases before per-student ledgers called student_alias
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
PIPELINE = "pipeline"
OUTSIDE = "outside the pipeline (MLflow UI or API)"
ANY_STUDENT = "*"  # a claim taken before claims were per student model: it holds the version for every recipe
HEARTBEAT_S = 30.0  # a running flow refreshes its claim this often; three missed beats make the claim stale
STALE_AFTER_S = 3 * HEARTBEAT_S

_metadata = sa.MetaData()
claims = sa.Table(
    "distill_claims_v2",
    _metadata,
    sa.Column("teacher_name", sa.String(256), primary_key=True),
    sa.Column("teacher_version", sa.String(32), primary_key=True),
    sa.Column("student_name", sa.String(256), primary_key=True),
    sa.Column("claimed_by", sa.String(256), nullable=False),
    sa.Column("host", sa.String(256), nullable=False, server_default=""),
    sa.Column("pid", sa.Integer, nullable=False, server_default="0"),
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),  # None while its run goes on
)
legacy_claims = sa.Table(  # releases before claims were per student model; read once, then emptied
    "distill_claims",
    sa.MetaData(),
    sa.Column("teacher_name", sa.String(256), primary_key=True),
    sa.Column("teacher_version", sa.String(32), primary_key=True),
    sa.Column("claimed_by", sa.String(256), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)
alias_moves = sa.Table(
    "distill_alias_history",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("version", sa.String(32)),  # None: the alias was removed
    sa.Column("from_version", sa.String(32)),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

locks = sa.Table(  # short-lived named locks across processes (one promotion decision at a time per student model)
    "distill_locks",
    _metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
)

deliveries = sa.Table(
    "distill_deliveries",
    _metadata,
    # 'delivery:<id>' or 'trigger:<teacher>/<version>/<student model>'
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("received_at", sa.Float, nullable=False),
)


class RegistryError(DistillError):
    """A registry operation that cannot be done: no such version, no previous champion, ..."""


@dataclass(frozen=True)
class Claim:
    """Who holds a (teacher version, student model) and whether they still beat their heart."""

    teacher_version: str
    student_name: str
    claimed_by: str
    host: str
    pid: int
    claimed_at: float
    heartbeat_at: float
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        """Its run ended (succeeded, rejected or failed): the claim only says the version was handled."""
        return self.finished_at is not None

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.claimed_at

    def stale(self, now: float | None = None) -> bool:
        """Its run neither finished nor goes on: no heartbeat for three intervals (killed, its machine lost), or, on
        this host, no process with its pid any more (known at once after a kill -9)."""
        if self.finished:
            return False
        if (now or time.time()) - self.heartbeat_at > STALE_AFTER_S:
            return True
        return self.host == socket.gethostname() and self.pid > 0 and not _process_exists(self.pid)

    def describe(self, now: float | None = None) -> str:
        now = now or time.time()
        if self.finished:
            return f"claimed by {self.claimed_by}, whose run ended {now - (self.finished_at or now):.0f} s ago"
        beat = f"last heartbeat {now - self.heartbeat_at:.0f} s ago"
        return (
            f"claimed by {self.claimed_by} {self.age_s(now):.0f} s ago ({beat}"
            + ("; STALE: its process is gone" if self.stale(now) else "")
            + ")"
        )


class Ledger:
    """Claims, deliveries and alias history in a SQL database shared by every process of the pipeline."""

    def __init__(self, url: str):
        args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, connect_args=args)
        try:
            _metadata.create_all(self.engine)
        except sa.exc.DBAPIError:  # another process created the tables in the same instant (PostgreSQL says so)
            _metadata.create_all(self.engine)

    def legacy_claims(self) -> list[Any]:
        """Claims an earlier release took (keyed by teacher version alone), not yet adopted; see upgrade_ledger."""
        if not sa.inspect(self.engine).has_table(legacy_claims.name):
            return []
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(legacy_claims)).all())

    def adopt_legacy_claim(self, row: Any, student: str) -> None:
        """Move one legacy claim to the per-student table, as the claim of `student` (ANY_STUDENT: unknown)."""
        with self.engine.begin() as conn:
            with contextlib.suppress(sa.exc.IntegrityError), conn.begin_nested():
                conn.execute(
                    claims.insert().values(
                        teacher_name=row.teacher_name,
                        teacher_version=row.teacher_version,
                        student_name=student,
                        claimed_by=row.claimed_by,
                        host="",
                        pid=0,
                        claimed_at=row.claimed_at,
                        heartbeat_at=row.claimed_at,  # never beat: it reads as stale, and --rerun --force may take it
                    )
                )
            conn.execute(
                legacy_claims.delete().where(
                    legacy_claims.c.teacher_name == row.teacher_name,
                    legacy_claims.c.teacher_version == row.teacher_version,
                )
            )

    def claim(self, teacher: str, version: str, student: str, claimant: str) -> bool:
        """True for exactly one caller per (teacher version, student model); everyone else gets False."""
        now = time.time()
        row = {
            "teacher_name": teacher,
            "teacher_version": str(version),
            "student_name": student,
            "claimed_by": claimant,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": now,
            "heartbeat_at": now,
        }
        if self.claim_of(teacher, version, ANY_STUDENT) is not None:
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(claims.insert().values(**row))
        except sa.exc.IntegrityError:
            return False
        return True

    def _where(self, teacher: str, version: str, student: str) -> Any:
        return sa.and_(
            claims.c.teacher_name == teacher,
            claims.c.teacher_version == str(version),
            claims.c.student_name.in_([student, ANY_STUDENT]),
        )

    def beat(self, teacher: str, version: str, student: str) -> None:
        """Refresh a claim's heartbeat (the running flow does, every HEARTBEAT_S)."""
        with self.engine.begin() as conn:
            conn.execute(claims.update().where(self._where(teacher, version, student)).values(heartbeat_at=time.time()))

    @contextlib.contextmanager
    def heartbeat(self, teacher: str, version: str, student: str, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Beat for the claim while the block runs, on a daemon thread (it dies with the process, as it should)."""
        stop = threading.Event()

        def beat_until_stopped() -> None:
            while not stop.wait(interval_s):
                with contextlib.suppress(sa.exc.SQLAlchemyError):  # one missed beat is not a failure
                    self.beat(teacher, version, student)

        thread = threading.Thread(target=beat_until_stopped, name="distill-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def finish(self, teacher: str, version: str, student: str) -> None:
        """Mark the claim's run as ended: the version stays handled, and a rerun may release the claim."""
        with self.engine.begin() as conn:
            conn.execute(claims.update().where(self._where(teacher, version, student)).values(finished_at=time.time()))

    def release(self, teacher: str, version: str, student: str) -> None:
        """Forget a claim, so the version can be run again on purpose (a retry of a failed run)."""
        with self.engine.begin() as conn:
            conn.execute(claims.delete().where(self._where(teacher, version, student)))

    def claim_of(self, teacher: str, version: str, student: str) -> Claim | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(claims).where(self._where(teacher, version, student))).first()
        return _claim(row) if row is not None else None

    def claims(self, teacher: str, student: str) -> dict[str, Claim]:
        """The claims on the teacher's versions that hold them for this student model, by version."""
        query = sa.select(claims).where(
            claims.c.teacher_name == teacher, claims.c.student_name.in_([student, ANY_STUDENT])
        )
        with self.engine.connect() as conn:
            return {row.teacher_version: _claim(row) for row in conn.execute(query)}

    def claimed(self, teacher: str, student: str) -> dict[str, str]:
        """Claimed versions of the teacher for this student model, and who holds each."""
        return {version: c.claimed_by for version, c in self.claims(teacher, student).items()}

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float = 600.0, held_at_most_s: float = 600.0) -> Iterator[None]:
        """Hold a named lock shared by every process of the ledger database. A holder that died (its process is
        gone from its host, or it held the lock longer than held_at_most_s) is taken over."""
        me = {"name": name[:512], "host": socket.gethostname(), "pid": os.getpid()}
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.engine.begin() as conn:
                    conn.execute(locks.insert().values(**me, acquired_at=time.time()))
                break
            except sa.exc.IntegrityError:
                with self.engine.connect() as conn:
                    holder = conn.execute(sa.select(locks).where(locks.c.name == me["name"])).first()
                if holder is not None and _holder_gone(holder, held_at_most_s):
                    with self.engine.begin() as conn:
                        conn.execute(
                            locks.delete().where(locks.c.name == me["name"], locks.c.acquired_at == holder.acquired_at)
                        )
                    continue
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"lock {name!r} is held by pid {holder.pid if holder else '?'}: gave up"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            with self.engine.begin() as conn:
                conn.execute(locks.delete().where(locks.c.name == me["name"], locks.c.pid == me["pid"]))

    def first_time(self, key: str) -> bool:
        """True for exactly one caller per key (a webhook delivery id, a trigger): the receiver's idempotency."""
        try:
            with self.engine.begin() as conn:
                conn.execute(deliveries.insert().values(key=key[:512], received_at=time.time()))
        except sa.exc.IntegrityError:
            return False
        return True

    def forget(self, *keys: str) -> None:
        """Undo first_time for these keys (what they started did not start after all, so a retry may)."""
        with self.engine.begin() as conn:
            conn.execute(deliveries.delete().where(deliveries.c.key.in_([k[:512] for k in keys])))

    def record_alias(
        self, model: str, alias: str, version: str | None, from_version: str | None, actor: str, reason: str
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                alias_moves.insert().values(
                    model_name=model,
                    alias=alias,
                    version=version,
                    from_version=from_version,
                    actor=actor,
                    reason=reason,
                    at=time.time(),
                )
            )

    def alias_history(self, model: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every recorded move of the model's aliases, oldest first."""
        query = sa.select(alias_moves).where(alias_moves.c.model_name == model).order_by(alias_moves.c.id)
        if alias is not None:
            query = query.where(alias_moves.c.alias == alias)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def _holder_gone(holder: Any, held_at_most_s: float) -> bool:
    if time.time() - holder.acquired_at > held_at_most_s:
        return True
    return holder.host == socket.gethostname() and not _process_exists(holder.pid)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _claim(row: Any) -> Claim:
    return Claim(
        row.teacher_version,
        row.student_name,
        row.claimed_by,
        row.host,
        row.pid,
        row.claimed_at,
        row.heartbeat_at,
        row.finished_at,
    )


# --- teachers and the ledger tags --------------------------------------------------------------------------


def teacher_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """All versions of a registered model, oldest first."""
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=200, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version))


def require_version(client: MlflowClient, name: str, version: str, what: str = "teacher") -> ModelVersion:
    """The registered version, or one clear RegistryError naming what exists (checked before anything is claimed)."""
    if not str(version).isdigit():
        raise RegistryError(f"{what} version must be a number, got {version!r}")
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    existing = [v.version for v in teacher_versions(client, name)]
    if not existing:
        raise RegistryError(
            f"no registered model {name!r} in the MLflow registry: check the recipe's "
            f"{'teacher.registered_name' if what == 'teacher' else 'student_registered_name'} and MLFLOW_TRACKING_URI"
        )
    raise RegistryError(f"{what} {name!r} has no version {version} (it has {', '.join(f'v{v}' for v in existing)})")


def ledger_tag(student: str, field: str) -> str:
    """The teacher-version tag of one ledger field for one student model: distill.<student>.<field>."""
    return names.tag(f"{student}.{field}")


def set_ledger(client: MlflowClient, name: str, version: str, student: str, status: str, **fields: str) -> None:
    """Write one student model's ledger on a teacher version: status plus student_version, run_id, error, ..."""
    if status not in STATUSES:
        raise ValueError(f"ledger status must be one of {STATUSES}, got {status!r}")
    unknown = set(fields) - set(LEDGER_FIELDS)
    if unknown:
        raise ValueError(f"unknown ledger fields {sorted(unknown)}; fields are {LEDGER_FIELDS}")
    client.set_model_version_tag(name, version, ledger_tag(student, "status"), status)
    client.set_model_version_tag(name, version, ledger_tag(student, "updated_at"), _now())
    for key, value in fields.items():
        client.set_model_version_tag(name, version, ledger_tag(student, key), str(value)[:4900])


def _legacy_ledger(version: ModelVersion) -> dict[str, str]:
    """The flat distill.<field> ledger earlier releases wrote (one per teacher version, whoever's student)."""
    flat = names.fields_of(version.tags)
    entry = {k: flat[k] for k in LEDGER_FIELDS if k in flat}
    if LEGACY_ALIAS_FIELD in flat:
        entry.setdefault("student_alias", flat[LEGACY_ALIAS_FIELD])
    return entry if "status" in entry else {}


def _legacy_student(client: MlflowClient, entry: dict[str, str], cache: dict[str, str | None]) -> str | None:
    """Whose ledger a flat entry is: the student model of its MLflow run's experiment (distill-<student>)."""
    run_id = entry.get("run_id")
    if not run_id:
        return None
    if run_id not in cache:
        try:
            experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
            cache[run_id] = experiment.name.removeprefix("distill-") if experiment.name.startswith("distill-") else None
        except MlflowException:
            cache[run_id] = None
    return cache[run_id]


def ledgers_of(
    client: MlflowClient, version: ModelVersion, cache: dict[str, str | None] | None = None
) -> dict[str, dict[str, str]]:
    """Every student model's ledger on a teacher version, by student model (flat entries of earlier releases too)."""
    cache = {} if cache is None else cache
    out: dict[str, dict[str, str]] = {}
    for key, value in names.fields_of(version.tags).items():
        student, _, field = key.rpartition(".")
        if student and field in LEDGER_FIELDS:
            out.setdefault(student, {})[field] = value
    legacy = _legacy_ledger(version)
    if legacy:
        owner = _legacy_student(client, legacy, cache) or ANY_STUDENT
        if owner not in out:
            out[owner] = legacy
    return out


def ledger_entry(
    client: MlflowClient, version: ModelVersion, student: str, cache: dict[str, str | None] | None = None
) -> dict[str, str]:
    """One student model's ledger on a teacher version ({} when that student model never ran on it)."""
    entries = ledgers_of(client, version, cache)
    return entries.get(student) or entries.get(ANY_STUDENT, {})


def upgrade_ledger(client: MlflowClient, ledger: Ledger) -> None:
    """Adopt the claims of an earlier release: each becomes the claim of the student model its teacher version's
    flat ledger names (through its run's experiment), or of every student model (ANY_STUDENT) when none does."""
    cache: dict[str, str | None] = {}
    for row in ledger.legacy_claims():
        try:
            version = client.get_model_version(row.teacher_name, row.teacher_version)
        except MlflowException:
            owner = None
        else:
            legacy = _legacy_ledger(version)
            owner = _legacy_student(client, legacy, cache) if legacy else None
        ledger.adopt_legacy_claim(row, owner or ANY_STUDENT)


def unhandled_versions(client: MlflowClient, ledger: Ledger, name: str, student: str) -> list[str]:
    """Ready teacher versions that no run claimed for this student model and its ledger has not recorded."""
    upgrade_ledger(client, ledger)
    claimed = ledger.claimed(name, student)
    cache: dict[str, str | None] = {}  # run id -> student model, for flat ledgers of earlier releases
    return [
        str(v.version)
        for v in teacher_versions(client, name)
        if v.status == "READY" and str(v.version) not in claimed and not ledger_entry(client, v, student, cache)
    ]


def find_student_version(client: MlflowClient, student: str, idempotency_key: str) -> ModelVersion | None:
    """The student version already registered for this key (registration has no idempotency of its own)."""
    found = client.search_model_versions(f"name='{student}' and tags.`{names.IDEMPOTENCY_KEY}` = '{idempotency_key}'")
    return found[0] if found else None


# --- aliases ------------------------------------------------------------------------------------------------


def aliases(client: MlflowClient, model: str) -> dict[str, str]:
    """The model's aliases as {alias: version}; empty when the model does not exist yet."""
    try:
        return {alias: str(version) for alias, version in client.get_registered_model(model).aliases.items()}
    except MlflowException:
        return {}


def move_alias(
    client: MlflowClient, ledger: Ledger, model: str, alias: str, version: str | None, actor: str, reason: str
) -> None:
    """Point (or with version None, remove) an alias, and record the move."""
    before = aliases(client, model).get(alias)
    if before == (str(version) if version is not None else None):
        return
    if version is None:
        client.delete_registered_model_alias(model, alias)
    else:
        client.set_registered_model_alias(model, alias, str(version))
        client.set_model_version_tag(model, str(version), names.tag(f"{alias}_since"), _now())
        client.set_model_version_tag(model, str(version), names.tag(f"{alias}_by"), actor)
        if before is not None:
            client.set_model_version_tag(model, str(version), names.tag(f"{alias}_from"), before)
    ledger.record_alias(model, alias, str(version) if version is not None else None, before, actor, reason)


def failed_gates(version: ModelVersion) -> str | None:
    """Why a student version failed its gates (its distill.gate_reasons), or None when it passed or was not judged."""
    if version.tags.get(names.GATE) != names.GATE_FAILED:
        return None
    return version.tags.get(names.GATE_REASONS) or "gate failed"


def reconcile(client: MlflowClient, ledger: Ledger, model: str) -> list[str]:
    """Record alias moves made outside the pipeline (the MLflow UI), so the history stays complete.

    A serving alias put by hand on a student that failed its gates is recorded as a forced move of a failed
    student, with the gates it failed.
    """
    recorded: dict[str, str | None] = {}
    for move in ledger.alias_history(model):
        recorded[move["alias"]] = move["version"]
    current = aliases(client, model)
    noticed = []
    for alias in sorted(set(recorded) | set(current)):
        now = current.get(alias)
        if recorded.get(alias) != now:
            reason = "noticed by the pipeline"
            failed = failed_gates(client.get_model_version(model, now)) if now is not None else None
            if failed is not None:
                reason = f"FORCED move of a student that failed its gates ({failed}); noticed by the pipeline"
            ledger.record_alias(model, alias, now, recorded.get(alias), OUTSIDE, reason)
            noticed.append(f"{alias}: {recorded.get(alias)} -> {now}")
    return noticed


def champion_set_by_hand(client: MlflowClient, ledger: Ledger, model: str) -> bool:
    """Whether the current champion was put there by a person rather than by the pipeline."""
    reconcile(client, ledger, model)
    moves = ledger.alias_history(model, CHAMPION)
    return bool(moves) and moves[-1]["version"] is not None and moves[-1]["actor"] != PIPELINE


def promote(
    client: MlflowClient,
    ledger: Ledger,
    model: str,
    version: str,
    actor: str,
    reason: str,
    force: bool = False,
) -> None:
    """Make a version champion; the old champion becomes previous, a matching challenger alias is cleared.

    A student that failed its gates is refused unless force, and then the move is recorded as forced, with why.
    """
    try:
        target = client.get_model_version(model, str(version))
    except MlflowException:
        raise RegistryError(f"model '{model}' has no version {version}") from None
    failed = failed_gates(target)
    if failed is not None:
        if not force:
            raise RegistryError(
                f"{model} v{version} failed its gates ({failed}): it is not made champion. If you mean it, "
                "promote it with --force and a --reason, which the alias history keeps"
            )
        reason = f"FORCED although it failed its gates ({failed}): {reason}"
    current = aliases(client, model)
    old = current.get(CHAMPION)
    if old == str(version):
        return
    if old is not None:
        move_alias(client, ledger, model, PREVIOUS, old, actor, f"replaced as champion by v{version}")
    move_alias(client, ledger, model, CHAMPION, str(version), actor, reason)
    if current.get(CHALLENGER) == str(version):
        move_alias(client, ledger, model, CHALLENGER, None, actor, "promoted to champion")


def rollback(client: MlflowClient, ledger: Ledger, model: str, actor: str) -> str:
    """Restore the previous champion (the current one becomes previous, so a rollback can be undone)."""
    reconcile(client, ledger, model)
    current = aliases(client, model)
    if PREVIOUS not in current:
        raise RegistryError(f"model '{model}' has no '{PREVIOUS}' version to roll back to")
    target, old = current[PREVIOUS], current.get(CHAMPION)
    move_alias(client, ledger, model, CHAMPION, target, actor, f"rollback from v{old}")
    if old is not None:
        move_alias(client, ledger, model, PREVIOUS, old, actor, f"rolled back to v{target}")
    return target


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
