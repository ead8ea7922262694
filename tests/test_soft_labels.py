"""Soft labels: written as checksummed shards, reused by key, refused when corrupt or made by a broken teacher."""

import json

import numpy as np
import pytest
import torch
from toy_models import BagTeacher, WordHashTokenizer

from distill_core.errors import SoftLabelError, TeacherError
from distill_core.model_io import load_teacher, log_teacher
from distill_core.modules import LoadedTeacher, WrappedTeacher, content_digest
from distill_core.recipe import LMSignalConfig, SoftLabelConfig
from distill_core.soft_labels import generate_soft_labels, load_soft_labels, soft_label_key
from distill_core.store import LocalStore, open_store
from distill_core.students import hashed_ngrams

CFG = SoftLabelConfig(batch_size=32, max_length=64, shard_rows=100)


def _counted(loaded: LoadedTeacher) -> tuple[LoadedTeacher, list[int]]:
    calls: list[int] = []
    loaded.module.register_forward_hook(lambda *_: calls.append(1))
    return loaded, calls


def test_labels_are_sharded_with_a_manifest_and_reused(registered_teacher, small_dataset, tracking_uri, tmp_path):
    teacher, calls = _counted(load_teacher(*registered_teacher, tracking_uri))
    store = LocalStore(tmp_path)
    first = generate_soft_labels(teacher, small_dataset, CFG, store)
    assert not first.reused and calls
    manifest = json.loads((tmp_path / "soft_labels" / first.key / "manifest.json").read_text())
    assert manifest["rows"] == {s: small_dataset.counts[s] for s in ("transfer", "validation", "test")}
    assert sum(s["rows"] for s in manifest["shards"]) == sum(manifest["rows"].values())
    assert len([s for s in manifest["shards"] if s["split"] == "transfer"]) == -(
        -small_dataset.counts["transfer"] // 100
    )
    probabilities = np.exp(first.signal["test"]) / np.exp(first.signal["test"]).sum(1, keepdims=True)
    assert np.isfinite(first.signal["transfer"]).all() and probabilities.max(1).min() >= 0.5

    calls.clear()
    second = generate_soft_labels(teacher, small_dataset, CFG, store)
    assert second.reused and second.key == first.key and not calls
    np.testing.assert_array_equal(second.signal["transfer"], first.signal["transfer"])


def test_key_follows_teacher_data_and_settings(small_dataset):
    base = soft_label_key("t/1@abc", small_dataset.digest, CFG, "classification")
    assert base == soft_label_key(
        "t/1@abc", small_dataset.digest, CFG.model_copy(update={"batch_size": 8}), "classification"
    )  # batch size changes no label
    assert base != soft_label_key("t/2@abc", small_dataset.digest, CFG, "classification")
    assert base != soft_label_key("t/1@abc", "other-digest", CFG, "classification")
    assert base != soft_label_key(
        "t/1@abc", small_dataset.digest, CFG.model_copy(update={"max_length": 32}), "classification"
    )


def test_a_fixed_thread_count_joins_the_key_and_unset_it_is_the_key_earlier_releases_made():
    # the keys release 333b982 gave these settings: entries it stored are found again
    assert soft_label_key("t/1@abc", "d1", CFG, "classification") == "b27dd4e23621dc1c5ee78c13"
    sampled = LMSignalConfig(kind="sampled", k=8)
    assert soft_label_key("t/1@abc", "d1", sampled, "causal_lm") == "1d48ff37f6837433c3f3feb4"
    one, two = (CFG.model_copy(update={"threads": n}) for n in (1, 2))
    keys = {soft_label_key("t/1@abc", "d1", c, "classification") for c in (CFG, one, two)}
    assert len(keys) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto labels on the GPU here")
def test_labels_made_on_a_gpu_have_a_key_of_their_own_and_on_the_cpu_the_key_earlier_releases_made():
    keys = {d: soft_label_key("t/1@abc", "d1", CFG.model_copy(update={"device": d}), "classification")
            for d in ("auto", "cpu", "cuda")}  # fmt: skip
    assert keys["auto"] == keys["cpu"] == "b27dd4e23621dc1c5ee78c13" != keys["cuda"]


def test_corrupt_shard_is_refused_by_name(registered_teacher, small_dataset, tracking_uri, tmp_path):
    teacher = load_teacher(*registered_teacher, tracking_uri)
    labels = generate_soft_labels(teacher, small_dataset, CFG, LocalStore(tmp_path))
    shard = tmp_path / "soft_labels" / labels.key / "transfer-000000100.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SoftLabelError, match=f"soft_labels/{labels.key}/transfer-000000100.npy .* is corrupt"):
        load_soft_labels(LocalStore(tmp_path), labels.key)


def test_interrupted_entry_is_not_read_and_a_rerun_labels_only_the_missing_shards(
    registered_teacher, small_dataset, tracking_uri, tmp_path
):
    teacher, calls = _counted(load_teacher(*registered_teacher, tracking_uri))
    store = LocalStore(tmp_path)
    whole = generate_soft_labels(teacher, small_dataset, CFG, store)
    entry = tmp_path / "soft_labels" / whole.key
    (entry / "manifest.json").unlink()  # as if killed after some shards, before the manifest
    (entry / "transfer-000000200.npy").unlink()
    with pytest.raises(SoftLabelError, match=f"no complete soft labels under key {whole.key}"):
        load_soft_labels(store, whole.key)
    calls.clear()
    again = generate_soft_labels(teacher, small_dataset, CFG, store)
    assert not again.reused and len(calls) == -(-100 // CFG.batch_size)  # one shard's batches, no more
    assert again.manifest["reused_shards"] == len(again.manifest["shards"]) - 1
    for split, signal in whole.signal.items():
        np.testing.assert_array_equal(again.signal[split], signal)
    assert load_soft_labels(store, whole.key).manifest["shards"] == whole.manifest["shards"]


def _bad_teacher(tracking_uri, **kwargs) -> LoadedTeacher:
    module = WrappedTeacher(BagTeacher(**kwargs), WordHashTokenizer(), labels=("fresh", "rotten"))
    name, version = log_teacher(module, "broken-teacher", tracking_uri)
    return load_teacher(name, version, tracking_uri)


def test_nan_teacher_names_the_rows_and_stores_nothing(small_dataset, tracking_uri, tmp_path):
    texts = small_dataset.split("transfer")["text"].tolist()
    word = next(w for w in texts[3].lower().split() if w.isalpha())
    teacher = _bad_teacher(tracking_uri, poison=word)
    with pytest.raises(SoftLabelError) as err:
        generate_soft_labels(teacher, small_dataset, CFG, LocalStore(tmp_path))
    poisoned = hashed_ngrams(word, 1, 512)[0]
    bad_rows = [i for i, t in enumerate(texts) if poisoned in hashed_ngrams(t, 1, 512)]
    first_bad = bad_rows[0]
    shard = first_bad // CFG.shard_rows * CFG.shard_rows  # the first shard with a bad row stops the labeling
    in_shard = [r for r in bad_rows if shard <= r < shard + CFG.shard_rows]
    assert f"for {len(in_shard)} of {CFG.shard_rows} rows from row {shard} (first: row {first_bad}," in str(err.value)
    assert not list(tmp_path.rglob("manifest.json"))


def test_wrongly_shaped_teacher_is_refused(small_dataset, tracking_uri, tmp_path):
    module = WrappedTeacher(BagTeacher(extra_classes=1), WordHashTokenizer(), labels=("fresh", "rotten"))
    teacher = LoadedTeacher(module, "shape-teacher", "1", content_digest(module))
    with pytest.raises(TeacherError, match=r"returned logits of shape \(32, 3\); expected \(32, 2\)"):
        generate_soft_labels(teacher, small_dataset, CFG, LocalStore(tmp_path))
    assert not list(tmp_path.rglob("manifest.json"))


def test_labels_round_trip_through_s3(registered_teacher, small_dataset, tracking_uri, s3_env):
    teacher = load_teacher(*registered_teacher, tracking_uri)
    store = open_store(f"s3://{s3_env}/distill")
    first = generate_soft_labels(teacher, small_dataset, CFG, store)
    assert store.exists(f"soft_labels/{first.key}/manifest.json")
    second = generate_soft_labels(teacher, small_dataset, CFG, open_store(f"s3://{s3_env}/distill"))
    assert second.reused
    np.testing.assert_array_equal(second.signal["test"], first.signal["test"])


def test_an_entry_stored_by_the_previous_release_is_reused_as_it_is(
    registered_teacher, small_dataset, tracking_uri, tmp_path
):
    """Release 333b982 named shards by their index (transfer-00000.npy) and wrote no reused_shards; its manifest
    lists its files, so the entry is found by the same key and read, not relabeled."""
    teacher, calls = _counted(load_teacher(*registered_teacher, tracking_uri))
    store = LocalStore(tmp_path)
    made = generate_soft_labels(teacher, small_dataset, CFG, store)
    entry, manifest = tmp_path / "soft_labels" / made.key, dict(made.manifest)
    manifest.pop("reused_shards")
    for split in ("transfer", "validation", "test"):  # the old names, index by index
        for index, shard in enumerate(s for s in manifest["shards"] if s["split"] == split):
            old = f"{split}-{index:05d}.npy"
            (entry / shard["file"]).rename(entry / old)
            shard["file"] = old
    (entry / "manifest.json").write_text(json.dumps(manifest))
    calls.clear()
    again = generate_soft_labels(teacher, small_dataset, CFG, store)
    assert again.reused and not calls and again.key == made.key
    for split, signal in made.signal.items():
        np.testing.assert_array_equal(again.signal[split], signal)
