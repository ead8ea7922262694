"""Great Expectations gates that stop the pipeline before training: the dataset, the soft labels, the evaluation table.

Each check turns its input into plain pandas frames (one per split or table), validates them against suites built
here and rebuilds one data-docs site for docs_dir. The GX project (suites, stored results) lives in docs_dir/gx, so
all three suites and every earlier run share one index.html: ours, a static page that lists every validation result
and opens offline (GX's own index builds its tables with scripts from a CDN; it stays as gx-index.html). The site,
`site_dir(docs_dir)`, is what the pipeline logs to its run as data_docs/. A check returns a CheckResult and
never raises for bad data; `raise_on_failure(result)` turns a failed result into ChecksFailed, which is how the
pipeline stops.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from distill_core.data import SPLITS, UNLABELED, PreparedDataset
from distill_core.errors import DistillError

if TYPE_CHECKING:
    from distill_core.soft_labels import SoftLabels

LABELED_SPLITS = ("train", "validation", "test")  # every row has a label id in 0..C-1; duplicates are refused
MAX_SPLIT_ROWS = 50_000_000  # a generous ceiling: more rows than this is a bug upstream, not a bigger corpus
MIN_CLASS_WEIGHT = 1e-6  # floor for the expected class shares, so a class absent from train gives a finite KL
DOCS_SITE = "local_site"  # the file project's default site: docs_dir/gx/uncommitted/data_docs/local_site
_GX_LOCK = threading.Lock()  # one writer at a time for a GX file project within this process


class ChecksFailed(DistillError):
    """A suite of data checks failed; `failures` has one line per failed expectation."""

    def __init__(self, suite: str, failures: list[str], docs_index: Path | str | None = None) -> None:
        self.suite, self.failures, self.docs_index = suite, failures, docs_index
        docs = f"; details in the data docs at {docs_index}" if docs_index else ""
        super().__init__(f"{suite} checks failed: " + "; ".join(failures) + docs)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Prefect stores a task's exception)
        return (type(self), (self.suite, self.failures, self.docs_index))


@dataclass
class CheckResult:
    """The outcome of one suite run: how many expectations ran, which failed and where the data docs are."""

    suite: str
    success: bool
    evaluated: int
    failures: list[str]
    docs_index: Path | None


def raise_on_failure(result: CheckResult) -> CheckResult:
    """Pass a successful result through; raise ChecksFailed (with every failure line) for a failed one."""
    if not result.success:
        raise ChecksFailed(result.suite, result.failures, result.docs_index)
    return result


def check_dataset(
    dataset: PreparedDataset, docs_dir: Path, *, max_duplicate_share: float = 0.05, min_rows: int = 20
) -> CheckResult:
    """Columns, texts, label ids, row counts and duplicate share of every split, and every class present in train.

    The duplicate share counts every row whose text occurs more than once in its split (both copies of a pair).
    """
    import great_expectations.expectations as gxe

    classes = list(range(len(dataset.labels)))
    tables: dict[str, tuple[pd.DataFrame, list[Any]]] = {}
    for split in SPLITS:
        frame = dataset.split(split)
        if "text" in frame.columns:  # derived here: GX has no "non-empty after strip" expectation
            frame = frame.assign(text_length=frame["text"].astype("str").str.strip().str.len())
        allowed = classes if split in LABELED_SPLITS else [UNLABELED, *classes]
        expectations = [
            gxe.ExpectTableColumnsToMatchSet(column_set=["text", "label", "text_length"], exact_match=True),
            gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, max_value=MAX_SPLIT_ROWS),
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToBeBetween(column="text_length", min_value=1),
            gxe.ExpectColumnValuesToNotBeNull(column="label"),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=allowed),
        ]
        if split in LABELED_SPLITS:
            expectations.append(gxe.ExpectColumnValuesToBeUnique(column="text", mostly=1.0 - max_duplicate_share))
        if split == "train":
            expectations.append(gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=classes))
        tables[split] = (frame, expectations)
    return run_suite("dataset", tables, docs_dir, run_name=f"dataset-{dataset.digest[:12]}")


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.size == 0:
        return z
    with np.errstate(invalid="ignore", over="ignore"):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def probability_frame(logits: np.ndarray, labels: tuple[str, ...]) -> pd.DataFrame:
    """Per row: float64 probabilities per class, |sum - 1|, the argmax class and whether all logits are finite."""
    array = np.asarray(logits)
    if array.ndim != 2:  # a single class as a vector, or extra axes: still one row per text
        array = array[:, None] if array.ndim == 1 else array.reshape(len(array), -1)
    probs = _softmax64(array)
    names = [f"prob_{labels[i]}" if i < len(labels) else f"prob_{i}" for i in range(array.shape[1])]
    frame = pd.DataFrame(probs, columns=names)
    frame["row_sum_error"] = np.abs(probs.sum(axis=1) - 1.0)
    frame["predicted"] = probs.argmax(axis=1) if array.shape[1] else np.zeros(len(array), dtype=np.int64)
    frame["finite_logits"] = np.isfinite(array).all(axis=1)
    return frame


def class_partition(labels: pd.Series, classes: int) -> dict[str, list[Any]]:
    """A GX categorical partition of label ids 0..classes-1; every weight is floored so none is zero."""
    counts = np.bincount(labels[(labels >= 0) & (labels < classes)].to_numpy(dtype=np.int64), minlength=classes)
    weights = np.maximum(counts / max(counts.sum(), 1), MIN_CLASS_WEIGHT)
    return {"values": list(range(classes)), "weights": (weights / weights.sum()).tolist()}


def check_soft_labels(
    labels: SoftLabels,
    dataset: PreparedDataset,
    docs_dir: Path,
    *,
    max_row_sum_error: float = 1e-4,
    max_class_kl: float = 0.25,
) -> CheckResult:
    """Finite logits, valid probabilities, a row per dataset row, and transfer predictions shaped like train labels."""
    import great_expectations.expectations as gxe

    from distill_core.soft_labels import LABELED_SPLITS as SOFT_LABEL_SPLITS

    classes = len(dataset.labels)
    partition = class_partition(dataset.split("train").get("label", pd.Series(dtype="int64")), classes)
    prob_columns = [f"prob_{name}" for name in dataset.labels]
    tables: dict[str, tuple[pd.DataFrame, list[Any]]] = {}
    for split in SOFT_LABEL_SPLITS:
        logits = np.asarray(labels.signal.get(split, np.zeros((0, classes), dtype=np.float32)))
        expectations = [
            gxe.ExpectTableColumnsToMatchSet(
                column_set=[*prob_columns, "row_sum_error", "predicted", "finite_logits"], exact_match=True
            ),
            gxe.ExpectTableRowCountToEqual(value=int(dataset.counts[split])),
            gxe.ExpectColumnValuesToBeInSet(column="finite_logits", value_set=[True]),
            gxe.ExpectColumnValuesToNotBeNull(column="row_sum_error"),  # NaN would slip past the max below
            gxe.ExpectColumnMaxToBeBetween(column="row_sum_error", max_value=max_row_sum_error),
        ]
        for column in prob_columns:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
            expectations.append(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0, max_value=1))
        if split == "transfer":
            expectations.append(
                gxe.ExpectColumnKLDivergenceToBeLessThan(
                    column="predicted", partition_object=partition, threshold=max_class_kl
                )
            )
        tables[split] = (probability_frame(logits, dataset.labels), expectations)
    return run_suite("soft_labels", tables, docs_dir, run_name=f"soft_labels-{labels.key[:12]}")


def check_evaluation(reports: list[dict], docs_dir: Path) -> CheckResult:
    """The evaluation table (one Report.as_dict() per model): metrics in range, sizes and latencies positive."""
    import great_expectations.expectations as gxe

    from distill_core.evaluate import Report

    columns = list(Report.__dataclass_fields__)
    frame = pd.DataFrame(list(reports), columns=None if reports else columns)
    expectations: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=False),  # extra columns are fine
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="name"),
        *(gxe.ExpectColumnValuesToNotBeNull(column=column) for column in columns),
        *(gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in ("accuracy", "macro_f1")),
        gxe.ExpectColumnValuesToBeBetween(column="agreement", min_value=0, max_value=1),
        # no upper bound: a student may beat its teacher (born-again networks rely on it); the report says so
        gxe.ExpectColumnValuesToBeBetween(column="retention", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="ece", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="kl_to_teacher", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="params", min_value=0, strict_min=True),
        gxe.ExpectColumnValuesToBeBetween(column="p50_ms", min_value=0, strict_min=True),
        gxe.ExpectColumnValuesToBeBetween(column="p95_ms", min_value=0),
    ]
    return run_suite("evaluation", {"models": (frame, expectations)}, docs_dir)


def run_suite(
    suite: str, tables: dict[str, tuple[pd.DataFrame, list[Any]]], docs_dir: Path, run_name: str | None = None
) -> CheckResult:
    """Validate each table (GX suite '<suite>.<table>'), store the results and rebuild the docs site's pages and index.

    run_name shows in the docs; one containing "profiling" would be filed under profiling, not validations.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    evaluated = 0
    resources: list[Any] = []  # suite and result ids: only their pages are re-rendered, then the index
    with _GX_LOCK:
        context = gx.get_context(mode="file", project_root_dir=docs_dir)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_or_update_pandas(suite)  # fresh: drops the assets of earlier runs
        run_id = RunIdentifier(run_name=run_name or suite)
        for table, (frame, expectations) in tables.items():
            name = f"{suite}.{table}"
            batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole")
            gx_suite = context.suites.add_or_update(gx.ExpectationSuite(name, expectations=expectations))
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=name, data=batch, suite=gx_suite)
            )
            result = definition.run(
                batch_parameters={"dataframe": frame}, result_format={"result_format": "SUMMARY"}, run_id=run_id
            )
            evaluated += len(result.results)
            failures += [f"{table}: {describe_failure(r)}" for r in result.results if not r.success]
            suite_id = ExpectationSuiteIdentifier(name)
            resources += [suite_id, ValidationResultIdentifier(suite_id, run_id, result.batch_id)]
        context.build_data_docs(site_names=[DOCS_SITE], resource_identifiers=resources)
        docs_index = write_index(docs_dir)
    return CheckResult(suite, not failures, evaluated, failures, docs_index)


def site_dir(docs_dir: Path) -> Path:
    """The rendered data-docs site of a GX file project in docs_dir: index.html, validations/, expectations/."""
    return Path(docs_dir) / "gx" / "uncommitted" / "data_docs" / DOCS_SITE


def write_index(docs_dir: Path) -> Path:
    """The site's index.html: every stored validation result (suite, run, time, expectations, failures) linked to
    its GX page, in plain HTML that needs no network. GX's own index moves to gx-index.html."""
    site, stored = site_dir(docs_dir), Path(docs_dir) / "gx" / "uncommitted" / "validations"
    rows = []
    for path in stored.rglob("*.json"):
        result = json.loads(path.read_text())
        page = Path("validations") / path.relative_to(stored).with_suffix(".html")
        meta, stats = result.get("meta", {}), result.get("statistics", {})
        rows.append(
            (
                str(meta.get("validation_time", "")),
                result.get("suite_name", path.parent.name),
                str(meta.get("run_id", {}).get("run_name", "")),
                int(stats.get("evaluated_expectations", 0)),
                int(stats.get("unsuccessful_expectations", 0)),
                bool(result.get("success")),
                page.as_posix() if (site / page).exists() else None,
            )
        )
    rows.sort()
    failed = sum(1 for row in rows if not row[5])
    body = [
        f"<tr class='{'passed' if ok else 'failed'}'><td>{_link(suite, page)}</td><td>{html.escape(run)}</td>"
        f"<td>{html.escape(when)}</td><td>{evaluated}</td><td>{failures}</td><td>{'passed' if ok else 'FAILED'}</td>"
        "</tr>"
        for when, suite, run, evaluated, failures, ok, page in rows
    ]
    suites = sorted(p.relative_to(site).as_posix() for p in (site / "expectations").rglob("*.html"))
    gx_index = site / "index.html"
    if gx_index.exists() and "<!-- distill index -->" not in gx_index.read_text():
        gx_index.replace(site / "gx-index.html")
    gx_index.write_text(
        "<!doctype html>\n<!-- distill index -->\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>Data docs: validation results</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f3f3f3}"
        "tr.failed td{background:#fde8e8}tr.passed td:last-child{color:#1b7f3b}tr.failed td:last-child{color:#b00020;"
        "font-weight:bold}</style></head><body>"
        "<h1>Data docs: validation results</h1>"
        f"<p id='summary'>{len(rows)} validation results, {failed} failed. Each suite links to its Great Expectations "
        "page (its tables need no network; its styles load from the internet).</p>"
        "<table id='validation-results'><thead><tr><th>suite</th><th>run</th><th>validated at</th>"
        "<th>expectations</th><th>failed</th><th>result</th></tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table><h2>Expectation suites</h2><ul>"
        + "".join(
            f"<li>{_link(Path(p).with_suffix('').as_posix().removeprefix('expectations/'), p)}</li>" for p in suites
        )
        + "</ul><p><a href='gx-index.html'>Great Expectations' own index</a> (builds its tables with scripts from a "
        "CDN).</p></body></html>\n"
    )
    return gx_index


def _link(text: str, href: str | None) -> str:
    return f"<a href='{html.escape(href)}'>{html.escape(text)}</a>" if href else html.escape(text)


def _plain(value: Any, width: int = 80) -> str:
    """A short readable form of a value from a GX result (numpy scalars unwrapped, floats to 4 digits)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        text = "[" + ", ".join(_plain(v, 40) for v in value) + "]"
        width *= 2
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _exception_messages(info: Any) -> Iterable[str]:
    """GX reports exceptions flat, or nested under metric ids; yield every message."""
    if not isinstance(info, dict):
        return
    if info.get("raised_exception"):
        yield str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict):
            yield from _exception_messages(value)


def describe_failure(result: Any) -> str:
    """One line for a failed GX ExpectationValidationResult: type, column, what was observed versus expected."""
    config = result.expectation_config
    kwargs = config.kwargs
    where = f"{config.type}({kwargs['column']})" if "column" in kwargs else config.type
    expected = ", ".join(
        f"{key}={_plain(kwargs[key])}"
        for key in ("value", "min_value", "max_value", "value_set", "column_set", "threshold", "mostly")
        if kwargs.get(key) is not None
    )
    where += f" [expected {expected}]" if expected else ""
    messages = list(dict.fromkeys(_exception_messages(result.exception_info)))
    if messages:
        return f"{where}: could not be evaluated: {'; '.join(messages)}"
    outcome = result.result or {}
    if "unexpected_count" in outcome:
        rows = outcome.get("partial_unexpected_index_list") or []
        examples = _plain((outcome.get("partial_unexpected_list") or [])[:5])
        return (
            f"{where}: {outcome['unexpected_count']} of {outcome.get('element_count')} rows unexpected "
            f"({_plain(outcome.get('unexpected_percent'))}%), e.g. {examples}"
            + (f" at rows {_plain(rows[:5])}" if rows else "")
        )
    if "partial_missing_list" in outcome:
        return f"{where}: missing {_plain(outcome['partial_missing_list'])}"
    observed = outcome.get("observed_value")
    details = outcome.get("details") or {}
    if "observed_partition" in details:  # KL: show the two class distributions side by side
        shares = {k: _plain(details[k]["weights"]) for k in ("observed_partition", "expected_partition")}
        observed_text = "inf" if observed is None else _plain(observed)
        return (
            f"{where}: observed KL {observed_text}; predicted class shares {shares['observed_partition']} "
            f"versus train {shares['expected_partition']}"
        )
    mismatched = details.get("mismatched") or {}
    extra = "".join(f"; {kind} {_plain(cols)}" for kind, cols in mismatched.items())
    return f"{where}: observed {_plain(observed)}{extra}"
