"""Where things live: the embedded default under DISTILL_HOME, or what the environment points at.

One switch puts every artifact in S3: DISTILL_S3=s3://bucket/prefix sends the soft-label store to
<prefix>/soft-labels, MLflow's artifacts to <prefix>/mlflow and the DVC remote to <prefix>/dvc;
DISTILL_STORE, DISTILL_ARTIFACTS and DISTILL_DVC_REMOTE override one each (other buckets, say).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distill_core.errors import DistillError, StoreError

# What S3-compatible servers (MinIO, Ceph, moto) need from every boto3 client in the process, MLflow's
# and DVC's included: no default CRC checksums (boto3 >= 1.36, boto3#4392) and path-style addressing.
S3_COMPATIBLE_DEFAULTS = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path",
}


@dataclass(frozen=True)
class Settings:
    """Locations of the tracking store, the artifact stores and the working folders."""

    home: Path
    tracking_uri: str
    store_uri: str
    ledger_uri: str
    artifacts_uri: str | None = None  # MLflow artifact root for the experiments we create; None: MLflow decides
    dvc_remote: str | None = None  # DVC remote for the prepared data; None: the repository's own config
    search_uri: str | None = None  # the student search's Optuna storage; None: the ledger's database
    dask: str | None = None  # soft labels on Dask: "local" (a temporary cluster) or a scheduler's address
    dask_workers: int | None = None  # the temporary cluster's processes; None: one per core at the thread count

    @property
    def search_storage(self) -> str:
        """Where the student search keeps its studies: DISTILL_SEARCH_URI, else the ledger's database (Optuna's
        tables beside the ledger's)."""
        return self.search_uri or self.ledger_uri

    @property
    def search_cache(self) -> Path:
        """The size and latency of every architecture measured on this machine."""
        return self.home / "search" / "architectures.json"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def experiment_location(self, experiment: str) -> str | None:
        """Artifact location for a new experiment: DISTILL_ARTIFACTS, else next to the embedded SQLite store."""
        if self.artifacts_uri:
            return f"{self.artifacts_uri.rstrip('/')}/{experiment}"
        if self.tracking_uri.startswith("sqlite"):
            return f"{(self.home / 'mlartifacts').resolve().as_uri()}/{experiment}"
        return None  # a tracking server decides (its --artifacts-destination)

    def s3_locations(self) -> dict[str, str]:
        """The S3 URIs in use, by the setting that names them."""
        named = {
            "DISTILL_STORE": self.store_uri,
            "DISTILL_ARTIFACTS": self.artifacts_uri,
            "DISTILL_DVC_REMOTE": self.dvc_remote,
        }
        return {name: uri for name, uri in named.items() if uri and uri.startswith("s3://")}


def load_settings(home: str | Path | None = None) -> Settings:
    """Read DISTILL_HOME, MLFLOW_TRACKING_URI, DISTILL_S3 and its overrides, DISTILL_LEDGER_URI, DISTILL_SEARCH_URI,
    DISTILL_DASK, DISTILL_DASK_ADDRESS and DISTILL_DASK_WORKERS; else defaults."""
    root = Path(home or os.environ.get("DISTILL_HOME") or ".distill").resolve()
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    ledger = os.environ.get("DISTILL_LEDGER_URI") or f"sqlite:///{root / 'ledger.db'}"
    s3 = os.environ.get("DISTILL_S3", "").rstrip("/")
    if s3 and not s3.startswith("s3://"):
        raise StoreError(f"DISTILL_S3={s3!r} must look like s3://bucket or s3://bucket/prefix")

    def pick(variable: str, below_s3: str) -> str | None:
        return os.environ.get(variable) or (f"{s3}/{below_s3}" if s3 else None)

    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        home=root,
        tracking_uri=tracking,
        store_uri=pick("DISTILL_STORE", "soft-labels") or str(root / "store"),
        ledger_uri=ledger,
        artifacts_uri=pick("DISTILL_ARTIFACTS", "mlflow"),
        dvc_remote=pick("DISTILL_DVC_REMOTE", "dvc"),
        search_uri=os.environ.get("DISTILL_SEARCH_URI") or None,
        dask=_dask(),
        dask_workers=_positive("DISTILL_DASK_WORKERS"),
    )
    if settings.s3_locations():
        for name, value in S3_COMPATIBLE_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return settings


def _dask() -> str | None:
    """Where soft labels are made: DISTILL_DASK_ADDRESS (a running scheduler), DISTILL_DASK=local (a temporary
    cluster), else None (this process)."""
    address, mode = os.environ.get("DISTILL_DASK_ADDRESS", ""), os.environ.get("DISTILL_DASK", "")
    if address:
        if "://" not in address:
            raise DistillError(f"DISTILL_DASK_ADDRESS={address!r} must be a scheduler address like tcp://host:8786")
        return address
    if mode not in ("", "local"):
        raise DistillError(f"DISTILL_DASK={mode!r}: set it to 'local', or DISTILL_DASK_ADDRESS to a scheduler")
    return mode or None


def _positive(variable: str) -> int | None:
    value = os.environ.get(variable, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise DistillError(f"{variable}={value!r} must be a whole number of at least 1")
    return int(value)
