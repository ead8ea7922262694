"""`distill gc`: soft labels and run folders of teacher versions no aliased student needs go (dry run first);
what the champion and the previous champion were made from stays."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient
from test_cli import distill
from toy_models import BagTeacher, WordHashTokenizer

from distill_core.lineage import Lineage
from distill_core.modules import LoadedTeacher, WrappedTeacher, content_digest
from distill_core.recipe import SoftLabelConfig
from distill_core.registry import CHAMPION, PREVIOUS
from distill_core.retention import plan
from distill_core.settings import load_settings
from distill_core.soft_labels import generate_soft_labels
from distill_core.store import open_store

TEACHER, STUDENT = "gc-teacher", "gc-student"


def _home(small_dataset, tmp_path, monkeypatch):
    """Five teacher versions labeled and run; a student model whose champion came from v1, previous from v2."""
    for name in ("MLFLOW_TRACKING_URI", "DISTILL_STORE", "DISTILL_LEDGER_URI"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(tmp_path / "home")
    store, keys = open_store(settings.store_uri), {}
    for version in range(1, 6):
        module = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=small_dataset.labels)
        module.module.out.bias.data += version  # another teacher version: other weights, another key
        teacher = LoadedTeacher(module, TEACHER, str(version), content_digest(module))
        keys[version] = generate_soft_labels(teacher, small_dataset, SoftLabelConfig(), store).key
        folder = settings.runs_dir / f"demo-{TEACHER}-v{version}" / "bag" / "distilled"
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"x" * 1000)
    client = MlflowClient(settings.tracking_uri)
    client.create_registered_model(STUDENT)
    for teacher_version, alias in ((1, CHAMPION), (2, PREVIOUS)):
        lineage = Lineage(TEACHER, str(teacher_version), small_dataset.digest, soft_labels_key=keys[teacher_version])
        made = client.create_model_version(STUDENT, source=str(tmp_path), tags=lineage.tags())
        client.set_registered_model_alias(STUDENT, alias, made.version)
    return settings, store, keys


def test_gc_is_a_dry_run_until_told_and_never_deletes_what_an_alias_needs(small_dataset, tmp_path, monkeypatch):
    settings, store, keys = _home(small_dataset, tmp_path, monkeypatch)
    before = store.list("soft_labels/")
    dry = distill("gc", "--keep-versions", "2", home=settings.home)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete  soft labels  {TEACHER} v3" in dry.stdout
    assert f"would delete  run folder   {TEACHER} v3" in dry.stdout
    assert f"kept: {STUDENT}@champion (v1) needs it" in dry.stdout and f"{STUDENT}@previous (v2)" in dry.stdout
    assert "would free" in dry.stdout and "(dry run: --delete deletes them)" in dry.stdout
    assert store.list("soft_labels/") == before  # nothing deleted

    done = distill("gc", "--keep-versions", "2", "--delete", home=settings.home)
    assert done.returncode == 0, done.stderr
    left = {k.split("/")[1] for k in store.list("soft_labels/")}
    assert left == {keys[v] for v in (1, 2, 4, 5)}  # v3 gone; v4, v5 the newest two; v1, v2 behind aliases
    assert sorted(p.name for p in settings.runs_dir.iterdir()) == [f"demo-{TEACHER}-v{v}" for v in (1, 2, 4, 5)]
    assert "freed" in done.stdout


def test_by_age_everything_old_goes_but_what_the_aliases_need(small_dataset, tmp_path, monkeypatch):
    settings, _, keys = _home(small_dataset, tmp_path, monkeypatch)
    young = plan(settings, keep_versions=None, keep_days=30)
    assert not [i for i in young if i.delete]  # made just now
    old = plan(settings, keep_versions=None, keep_days=30, now=time.time() + 40 * 86400)
    going = {(i.kind, i.version) for i in old if i.delete}
    assert going == {(kind, str(v)) for kind in ("soft labels", "run folder") for v in (3, 4, 5)}
    assert all("40 days old (over 30)" in i.why for i in old if i.delete)
