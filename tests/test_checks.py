"""Data checks with real Great Expectations: the real small data passes, and each kind of corruption is named."""

import dataclasses
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest

from distill_core.checks import (
    CheckResult,
    ChecksFailed,
    check_dataset,
    check_evaluation,
    check_soft_labels,
    raise_on_failure,
)
from distill_core.data import PreparedDataset
from distill_core.evaluate import Report
from distill_core.model_io import load_teacher
from distill_core.recipe import SoftLabelConfig
from distill_core.soft_labels import SoftLabels, generate_soft_labels
from distill_core.store import LocalStore


@pytest.fixture(scope="module")
def soft_labels(registered_teacher, small_dataset, tracking_uri, tmp_path_factory) -> SoftLabels:
    """The real teacher's soft labels for the small dataset."""
    teacher = load_teacher(*registered_teacher, tracking_uri)
    return generate_soft_labels(teacher, small_dataset, SoftLabelConfig(), LocalStore(tmp_path_factory.mktemp("sl")))


def _with_logits(labels: SoftLabels, split: str, logits: np.ndarray) -> SoftLabels:
    return dataclasses.replace(labels, signal={**labels.signal, split: logits})


def _failures_about(result: CheckResult, *words: str) -> list[str]:
    return [line for line in result.failures if all(word in line for word in words)]


def test_real_dataset_passes_and_data_docs_name_the_suite(small_dataset, tmp_path):
    result = check_dataset(small_dataset, tmp_path / "docs")

    assert result.success, result.failures
    assert result.failures == [] and result.evaluated >= 4 * 6
    assert result.docs_index is not None and result.docs_index.is_file()
    assert result.docs_index.is_relative_to(tmp_path / "docs")
    assert "dataset.train" in result.docs_index.read_text()
    assert raise_on_failure(result) is result


def test_the_data_docs_index_lists_every_validation_result_offline_and_links_its_page(small_dataset, tmp_path):
    """GX's own index fills its tables from a CDN (empty offline); ours is plain HTML that lists each result."""
    import re

    docs = tmp_path / "docs"
    passed = check_dataset(small_dataset, docs)
    bad = tmp_path / "bad"
    shutil.copytree(small_dataset.root, bad)
    train = small_dataset.split("train")
    train.loc[3, "text"] = "   "  # empty after strip
    train.to_parquet(bad / "train.parquet", index=False)
    failed = check_dataset(PreparedDataset(bad, small_dataset.labels, small_dataset.digest, small_dataset.counts), docs)
    assert passed.success and not failed.success and failed.docs_index == passed.docs_index
    index = failed.docs_index.read_text()
    assert not re.search(r"(src|href)=['\"]https?://", index) and "<script" not in index
    rows = re.findall(r"<tr class='(passed|failed)'><td><a href='([^']+)'>dataset\.(\w+)</a>", index)
    assert {(status, split) for status, _, split in rows} >= {("passed", "train"), ("failed", "train")}
    assert f"{len(rows)} validation results, 1 failed" in index
    for _, page, _ in rows:
        assert (failed.docs_index.parent / page).is_file()
    assert (failed.docs_index.parent / "gx-index.html").is_file()  # GX's own index is kept beside it


def test_corrupt_dataset_fails_naming_each_problem(small_dataset, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(small_dataset.root, root)
    train = small_dataset.split("train")
    train = train[train["label"] == 0].reset_index(drop=True)  # class 1 is missing from train
    train.loc[3, "text"] = "   "  # empty after strip
    train.loc[5, "label"] = 7  # an unknown label id
    repeats = train.sample(frac=0.2, random_state=0)
    pd.concat([train, repeats], ignore_index=True).to_parquet(root / "train.parquet", index=False)
    small_dataset.split("validation").assign(source="web").to_parquet(root / "validation.parquet", index=False)
    small_dataset.split("test").head(5).to_parquet(root / "test.parquet", index=False)
    corrupt = PreparedDataset(root, small_dataset.labels, small_dataset.digest, small_dataset.counts)

    result = check_dataset(corrupt, tmp_path / "docs")

    assert not result.success
    assert _failures_about(result, "train:", "expect_column_values_to_be_between(text_length)", "1 of")
    assert _failures_about(result, "train:", "expect_column_values_to_be_in_set(label)", "e.g. [7]")
    assert _failures_about(result, "train:", "expect_column_values_to_be_unique(text)")
    assert _failures_about(result, "train:", "expect_column_distinct_values_to_contain_set(label)", "missing [1]")
    assert _failures_about(result, "validation:", "expect_table_columns_to_match_set", "source")
    assert _failures_about(result, "test:", "expect_table_row_count_to_be_between", "observed 5")
    assert not _failures_about(result, "transfer:")
    with pytest.raises(ChecksFailed, match=r"^dataset checks failed: ") as err:
        raise_on_failure(result)
    assert err.value.suite == "dataset" and err.value.failures == result.failures
    assert pickle.loads(pickle.dumps(err.value)).failures == result.failures  # Prefect can store it
    assert err.value.docs_index == result.docs_index and result.docs_index.is_file()


def test_real_soft_labels_pass_and_share_the_dataset_docs_site(soft_labels, small_dataset, tmp_path):
    dataset_result = check_dataset(small_dataset, tmp_path / "docs")
    result = check_soft_labels(soft_labels, small_dataset, tmp_path / "docs")

    assert result.success, result.failures
    assert result.docs_index == dataset_result.docs_index
    index = result.docs_index.read_text()
    assert "soft_labels.transfer" in index and "dataset.train" in index


def test_nan_logits_fail_naming_the_row(soft_labels, small_dataset, tmp_path):
    logits = soft_labels.signal["validation"].copy()
    logits[4] = np.nan

    result = check_soft_labels(_with_logits(soft_labels, "validation", logits), small_dataset, tmp_path)

    assert not result.success
    assert _failures_about(result, "validation:", "(finite_logits)", "1 of 30 rows", "at rows [4]")
    assert _failures_about(result, "validation:", "expect_column_values_to_not_be_null(prob_fresh)")
    assert all(line.startswith("validation:") for line in result.failures)


def test_infinite_logit_fails_even_though_its_probabilities_look_fine(soft_labels, small_dataset, tmp_path):
    logits = soft_labels.signal["test"].copy()
    logits[0, 1] = -np.inf  # softmax gives (1, 0): only the raw-logit check sees it

    result = check_soft_labels(_with_logits(soft_labels, "test", logits), small_dataset, tmp_path)

    assert [line.split(" [")[0] for line in result.failures] == [
        "test: expect_column_values_to_be_in_set(finite_logits)"
    ]


def test_soft_labels_missing_transfer_rows_fail_on_row_count(soft_labels, small_dataset, tmp_path):
    truncated = _with_logits(soft_labels, "transfer", soft_labels.signal["transfer"][:-10])

    result = check_soft_labels(truncated, small_dataset, tmp_path)

    rows = small_dataset.counts["transfer"]
    assert _failures_about(
        result, "transfer:", "expect_table_row_count_to_equal", f"value={rows}", f"observed {rows - 10}"
    )


def test_one_class_teacher_fails_the_class_distribution_check(soft_labels, small_dataset, tmp_path):
    rows = small_dataset.counts["transfer"]
    one_class = np.tile(np.array([[4.0, -4.0]], dtype=np.float32), (rows, 1))

    result = check_soft_labels(_with_logits(soft_labels, "transfer", one_class), small_dataset, tmp_path)

    [line] = result.failures
    assert line.startswith("transfer: expect_column_kl_divergence_to_be_less_than(predicted) [expected threshold=0.25]")
    assert "predicted class shares [1, 0]" in line
    with pytest.raises(ChecksFailed, match=r"^soft_labels checks failed: transfer: expect_column_kl"):
        raise_on_failure(result)


def _report(name: str, **changes) -> dict:
    values = dict(accuracy=0.8, macro_f1=0.79, agreement=0.9, kl_to_teacher=0.05, ece=0.04, p50_ms=1.2, p95_ms=2.0)
    values |= dict(throughput=900.0, params=120_000, bytes=480_000, compression=190.0, speedup=8.0, retention=0.95)
    return Report(name=name, **(values | changes)).as_dict()


def test_evaluation_table_passes_and_fails_by_column(tmp_path):
    good = check_evaluation([_report("teacher", retention=1.0), _report("student")], tmp_path)
    bad = check_evaluation([_report("teacher"), _report("student", accuracy=1.7), _report("tiny", params=0)], tmp_path)

    assert good.success, good.failures
    assert _failures_about(bad, "models:", "expect_column_values_to_be_between(accuracy)", "e.g. [1.7]", "rows [1]")
    assert _failures_about(bad, "models:", "expect_column_values_to_be_between(params)", "e.g. [0]", "rows [2]")
    assert len(bad.failures) == 2
    with pytest.raises(ChecksFailed, match=r"^evaluation checks failed: models: ") as err:
        raise_on_failure(bad)
    assert "accuracy" in str(err.value) and "params" in str(err.value) and str(bad.docs_index) in str(err.value)


def test_duplicate_names_and_missing_values_fail(tmp_path):
    rows = [_report("student"), _report("student", ece=None)]

    result = check_evaluation(rows, tmp_path)

    assert _failures_about(result, "expect_column_values_to_be_unique(name)", "2 of 2 rows")
    assert _failures_about(result, "expect_column_values_to_not_be_null(ece)", "rows [1]")


def test_a_student_better_than_its_teacher_passes_the_evaluation_checks(tmp_path):
    """Born-again students beat their teachers; a weak teacher is beaten easily. It used to stop the run at 1.5."""
    result = check_evaluation([_report("teacher", retention=1.0), _report("student", retention=1.62)], tmp_path)
    assert result.success, result.failures
