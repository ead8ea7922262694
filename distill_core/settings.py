"""Where things live: the embedded default under DISTILL_HOME, or what the environment points at."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Locations of the tracking store, the artifact store and the working folders."""

    home: Path
    tracking_uri: str
    store_uri: str
    ledger_uri: str

    @property
    def artifact_root(self) -> str:
        """Where MLflow puts run artifacts when the tracking store is the embedded SQLite file."""
        return (self.home / "mlartifacts").resolve().as_uri()

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def load_settings(home: str | Path | None = None) -> Settings:
    """Read DISTILL_HOME, MLFLOW_TRACKING_URI, DISTILL_STORE and DISTILL_LEDGER_URI, else the embedded default."""
    root = Path(home or os.environ.get("DISTILL_HOME") or ".distill").resolve()
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    store = os.environ.get("DISTILL_STORE") or str(root / "store")
    ledger = os.environ.get("DISTILL_LEDGER_URI") or f"sqlite:///{root / 'ledger.db'}"
    root.mkdir(parents=True, exist_ok=True)
    return Settings(home=root, tracking_uri=tracking, store_uri=store, ledger_uri=ledger)
