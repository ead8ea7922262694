"""Prepared data through DVC: a path in a repository at a git revision becomes files on disk plus DVC's md5.

Two ways in, both ending in a PreparedDataset whose digest is DVC's md5 and whose `version` names the data:
- the workspace (no revision): the folder must match what dvc.lock records, or the run stops and names the
  files that changed behind DVC's back;
- a git revision (any repository DVC can reach, local or a git URL): the files come from the DVC cache or
  the remote into a folder under DISTILL_HOME named by the md5, written under a temporary name first.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill_core.data import DataVersion, PreparedDataset, load_prepared
from distill_core.errors import DatasetError
from distill_core.recipe import DvcDataRef
from distill_core.settings import Settings

DVC_REMOTE_NAME = "distill"


def dvc_config(settings: Settings) -> dict[str, Any] | None:
    """Config on top of the repository's own: DISTILL_DVC_REMOTE as the default remote (endpoint from AWS_*)."""
    if not settings.dvc_remote:
        return None
    return {"core": {"remote": DVC_REMOTE_NAME}, "remote": {DVC_REMOTE_NAME: {"url": settings.dvc_remote}}}


def _is_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@")


def _remote_hint(settings: Settings) -> str:
    return f"DVC remote {settings.dvc_remote} (DISTILL_DVC_REMOTE)" if settings.dvc_remote else "the DVC remote"


def open_versioned(ref: DvcDataRef, base_dir: Path, settings: Settings) -> PreparedDataset:
    """The prepared dataset that `ref` names, checked against DVC's record of it."""
    if ref.rev is None and not _is_url(ref.repo):
        return _from_workspace(ref, (base_dir / ref.repo).resolve(), settings)
    repo = ref.repo if _is_url(ref.repo) else str((base_dir / ref.repo).resolve())
    return _from_revision(ref, repo, ref.rev, settings)


def data_identity(ref: DvcDataRef, base_dir: Path, settings: Settings) -> str:
    """DVC's md5 of the data `ref` names as it is now (the workspace's dvc.lock, or the revision's), read without
    fetching the data: what a watcher compares with the md5 the current student was distilled from."""
    if ref.rev is None and not _is_url(ref.repo):
        with _open_repo((base_dir / ref.repo).resolve(), settings) as repo:
            return _recorded_md5(repo, ref.path)
    from dvc.api import DVCFileSystem

    repo_path = ref.repo if _is_url(ref.repo) else str((base_dir / ref.repo).resolve())
    return str(DVCFileSystem(repo_path, rev=ref.rev, config=dvc_config(settings)).info(ref.path)["md5"] or "")


def _open_repo(root: Path, settings: Settings) -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root), config=dvc_config(settings))
    except NotDvcRepoError:
        raise DatasetError(
            f"{root} is not a DVC repository (recipe data.dvc.repo): run `dvc init` there or fix the recipe"
        ) from None


def _recorded_md5(repo: Any, path: str) -> str:
    """The md5 that dvc.lock (or a .dvc file) records for path."""
    wanted = path.rstrip("/")
    for stage in repo.index.stages:
        for out in stage.outs:
            if out.def_path.rstrip("/") == wanted:
                if not out.hash_info or not out.hash_info.value:
                    raise DatasetError(
                        f"DVC has no md5 for '{path}' in {repo.root_dir} yet: run `dvc repro` (or `dvc commit`)"
                    )
                return str(out.hash_info.value)
    raise DatasetError(
        f"'{path}' is not tracked by DVC in {repo.root_dir}: no stage of dvc.yaml and no .dvc file outputs it "
        "(recipe data.dvc.path)"
    )


def _changed_files(repo: Any, path: str) -> list[str]:
    """Files under path whose workspace content differs from what DVC recorded, as 'kind file'."""
    prefix = path.rstrip("/") + "/"
    uncommitted = repo.data_status(granular=True)["uncommitted"]
    return [
        f"{kind} {name}"
        for kind, names in sorted(uncommitted.items())
        for name in names
        if name.startswith(prefix) and not name.endswith("/")
    ]


def _from_workspace(ref: DvcDataRef, root: Path, settings: Settings) -> PreparedDataset:
    folder = root / ref.path
    with _open_repo(root, settings) as repo:
        md5 = _recorded_md5(repo, ref.path)
        if not folder.exists():
            _pull(repo, ref.path, settings)
        changed = _changed_files(repo, ref.path)
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise DatasetError(
                f"dataset {folder} changed behind DVC's back ({shown}); dvc.lock records md5 {md5}: "
                f"restore it with `dvc checkout {ref.path}`, or record the change with `dvc repro` / `dvc commit`"
            )
        rev = _workspace_rev(repo, ref.path, md5)
    version = DataVersion(repo=str(root), path=ref.path, rev=rev, md5=md5)
    return _with_version(load_prepared(folder), version)


def _pull(repo: Any, path: str, settings: Settings) -> None:
    try:
        repo.pull(targets=[path])
    except Exception as err:  # DVC raises many kinds; each means the data could not be fetched
        raise DatasetError(f"cannot pull '{path}' from {_remote_hint(settings)}: {err}") from err


def _workspace_rev(repo: Any, path: str, md5: str) -> str:
    """HEAD's commit when HEAD's dvc.lock records the same md5, else '<commit>+workspace' (or 'workspace')."""
    from dvc.api import DVCFileSystem

    try:
        head = str(repo.scm.get_rev())
    except Exception:  # no git, or no commit yet
        return "workspace"
    try:
        committed = DVCFileSystem(repo.root_dir, rev=head).info(path).get("md5")
    except FileNotFoundError:
        committed = None
    return head if committed == md5 else f"{head}+workspace"


def _from_revision(ref: DvcDataRef, repo: str, rev: str | None, settings: Settings) -> PreparedDataset:
    from dvc.api import DVCFileSystem

    what = f"'{ref.path}' at revision {rev or 'HEAD'} of {repo}"
    try:
        fs = DVCFileSystem(repo, rev=rev, config=dvc_config(settings))
        md5 = str(fs.info(ref.path)["md5"] or "")
        commit = str(fs.repo.get_rev())
    except FileNotFoundError:
        raise DatasetError(f"{what} does not exist or is not tracked by DVC (recipe data.dvc)") from None
    except Exception as err:
        raise DatasetError(f"cannot open {what}: {err}") from err
    if not md5:
        raise DatasetError(f"{what} has no md5 in DVC's records: was `dvc repro` committed at that revision?")
    target = settings.data_dir / "dvc" / md5.removesuffix(".dir")
    if not (target / "dataset.json").is_file():
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            fs.get(ref.path, str(partial), recursive=True)
        except Exception as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise DatasetError(f"cannot fetch {what} from the DVC cache or {_remote_hint(settings)}: {err}") from err
        if target.exists():  # another process finished first; its copy is complete
            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, target)
    return _with_version(load_prepared(target), DataVersion(repo=repo, path=ref.path, rev=commit, md5=md5))


def _with_version(dataset: PreparedDataset, version: DataVersion) -> PreparedDataset:
    return replace(dataset, digest=version.md5, version=version)
