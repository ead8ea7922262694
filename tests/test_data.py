"""Data: real Rotten Tomatoes text, deterministic splits, a digest that notices changes, bad rows named."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distill_core.data import UNLABELED, load_prepared, load_source, prepare_dataset, validate_labeled
from distill_core.errors import DatasetError
from distill_core.recipe import DataConfig


def test_splits_are_disjoint_stratified_and_deterministic(tmp_path):
    cfg = DataConfig(max_rows=600, augment_copies=2, seed=3)
    first = prepare_dataset(cfg, tmp_path / "a")
    second = prepare_dataset(cfg, tmp_path / "b")
    assert first.digest == second.digest
    assert first.labels == ("fresh", "rotten")
    train, val, test = (set(first.split(s)["text"]) for s in ("train", "validation", "test"))
    assert not (train & val or train & test or val & test)
    assert sum(first.counts[s] for s in ("train", "validation", "test")) == 600
    assert first.counts["test"] == pytest.approx(120, abs=2)
    shares = [first.split(s)["label"].mean() for s in ("train", "test")]
    assert shares[0] == pytest.approx(shares[1], abs=0.03)


def test_transfer_split_holds_train_text_and_unlabeled_augmentations(tmp_path):
    data = prepare_dataset(DataConfig(max_rows=300, augment_copies=2), tmp_path)
    transfer, train = data.split("transfer"), data.split("train")
    assert len(transfer) == 3 * len(train)
    assert transfer["text"].head(len(train)).tolist() == train["text"].tolist()
    assert (transfer["label"].iloc[len(train) :] == UNLABELED).all()
    assert transfer["text"].iloc[len(train) :].str.len().gt(0).all()


def test_digest_changes_with_seed(tmp_path):
    a = prepare_dataset(DataConfig(max_rows=300, seed=0), tmp_path / "a")
    b = prepare_dataset(DataConfig(max_rows=300, seed=1), tmp_path / "b")
    assert a.digest != b.digest


def test_dataset_changed_behind_our_back_is_refused(tmp_path):
    data = prepare_dataset(DataConfig(max_rows=300), tmp_path)
    frame = data.split("test")
    frame.loc[0, "text"] = "an edited review"
    frame.to_parquet(tmp_path / "test.parquet", index=False)
    with pytest.raises(DatasetError, match="changed after it was prepared"):
        load_prepared(tmp_path)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            {"text": ["good", "  ", "bad"], "label": ["pos", "neg", "neg"]},
            "empty text in 1 row(s) (first: 1)",
        ),
        (
            {"text": ["good", "fine", "bad"], "label": ["pos", None, "neg"]},
            "missing label in 1 row(s) (first: 1)",
        ),
        (
            {"text": ["good", "fine", "bad"], "label": ["pos", "meh", "neg"]},
            "unknown label ['meh'] in 1 row(s)",
        ),
    ],
)
def test_bad_rows_are_named(rows, expected):
    with pytest.raises(DatasetError) as err:
        validate_labeled(pd.DataFrame(rows), labels=("neg", "pos"))
    assert expected in str(err.value)


def test_bad_file_source_leaves_nothing_that_looks_complete(tmp_path):
    source = tmp_path / "reviews.csv"
    pd.DataFrame({"text": ["a fine film", "", "dull"], "label": ["pos", "pos", "neg"]}).to_csv(source, index=False)
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError, match="empty text"):
        prepare_dataset(DataConfig(source=str(source)), out)
    assert not (out / "dataset.json").exists()
    with pytest.raises(DatasetError, match="no dataset.json"):
        load_prepared(out)


def test_file_source_without_label_column(tmp_path):
    source = tmp_path / "reviews.csv"
    pd.DataFrame({"text": ["a fine film"], "sentiment": ["pos"]}).to_csv(source, index=False)
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['label'\]"):
        prepare_dataset(DataConfig(source=str(source)), tmp_path / "out")


def _csv(path: Path, rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    words = ["warm", "funny", "moving", "dull", "tedious", "long", "bright", "sharp", "flat", "clever"]
    text = [" ".join(rng.choice(words, 5)) + f" {seed}-{i}" for i in range(rows)]
    pd.DataFrame({"text": text, "label": rng.choice(["pos", "neg"], rows)}).to_csv(path, index=False)
    return path


def test_a_changed_source_under_the_same_recipe_name_is_prepared_again(tmp_path):
    """Prepared data used to be keyed by the recipe's name alone: pointing data.source at another file reused the
    old splits silently, and the student was registered with the old dataset digest."""
    from distill_core import steps
    from distill_core.recipe import parse_recipe
    from distill_core.settings import load_settings

    settings = load_settings(tmp_path / "home")
    first_file, second_file = _csv(tmp_path / "a.csv", 120, 1), _csv(tmp_path / "b.csv", 120, 2)
    recipe = {"name": "same-name", "students": [{"name": "s", "family": "embedding_bag"}]}
    first = steps.open_dataset(parse_recipe({**recipe, "data": {"source": str(first_file)}}), settings)
    second = steps.open_dataset(parse_recipe({**recipe, "data": {"source": str(second_file)}}), settings)
    assert second.digest != first.digest and second.root != first.root
    assert set(second.split("train")["text"]) <= set(pd.read_csv(second_file)["text"])
    _csv(first_file, 120, 3)  # the same path, new content
    third = steps.open_dataset(parse_recipe({**recipe, "data": {"source": str(first_file)}}), settings)
    assert third.digest not in (first.digest, second.digest)
    fewer = steps.open_dataset(parse_recipe({**recipe, "data": {"source": str(first_file), "seed": 7}}), settings)
    assert fewer.digest != third.digest
    again = steps.open_dataset(parse_recipe({**recipe, "data": {"source": str(first_file)}}), settings)
    assert (again.root, again.digest) == (third.root, third.digest)  # unchanged: reused


def test_a_csv_that_is_not_utf8_is_named_with_the_byte_and_the_fix(tmp_path):
    source = tmp_path / "latin1.csv"
    source.write_bytes("text,label\ncaf\xe9 au lait,pos\nbad,neg\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.csv is not UTF-8: byte 0xe9 at offset 14 .*iconv -f latin1"):
        load_source(str(source))


def test_runs_that_prepare_the_same_data_at_once_all_get_it_and_it_is_prepared_once(tmp_path):
    """A burst of teacher versions started three flow runs on one host together: they wrote the same temporary
    parquet file, and the runs whose rename came second failed with FileNotFoundError."""
    import threading

    from distill_core import steps
    from distill_core.recipe import parse_recipe
    from distill_core.settings import load_settings

    settings = load_settings(tmp_path / "home")
    source = _csv(tmp_path / "a.csv", 120, 1)
    recipe = parse_recipe(
        {"name": "burst", "data": {"source": str(source)}, "students": [{"name": "s", "family": "embedding_bag"}]}
    )
    barrier, results, errors = threading.Barrier(6), [], []

    def run(call) -> None:
        barrier.wait()
        try:
            results.append(call())
        except Exception as err:  # noqa: BLE001 - every failure is the finding
            errors.append(repr(err))

    calls = [lambda: steps.open_dataset(recipe, settings)] * 3
    calls += [lambda: prepare_dataset(recipe.data, tmp_path / "direct")] * 3  # without the lock: still no clash
    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({r.digest for r in results}) == 1
    assert load_prepared(steps.dataset_dir(recipe, settings)).digest == results[0].digest
    assert not [p.name for p in (tmp_path / "direct").iterdir() if p.name.endswith(".tmp")]
