"""Artifact store: a local folder or an S3 prefix, with atomic writes and errors that name the fix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from distill_core.errors import StoreError

KeyList = list[str]  # module-level alias: inside the store classes `list` names the method
PathLike = str | os.PathLike[str]
_TEMP_SUFFIX = ".partial"
_MISSING = {"NoSuchKey", "404", "NotFound"}
_BOTO_ERRORS = (BotoCoreError, ClientError, S3UploadFailedError, RetriesExceededError)


class ArtifactNotFoundError(StoreError):
    """No object is stored under the requested key."""


def check_key(key: str, *, prefix: bool = False) -> str:
    """Reject keys that could escape the root or that the two backends would read differently."""
    if prefix and not key:
        return key  # the empty prefix: the whole store
    body = key[:-1] if prefix and key.endswith("/") else key
    if body.startswith("/") or any(part in ("", ".", "..") for part in body.split("/")):
        raise ValueError(f"invalid artifact key {key!r}: use relative 'a/b/c' keys without '..', '.' or '//'")
    return key


class ArtifactStore(Protocol):
    """Keys are '/'-separated and relative to the store root; writes are atomic in both backends."""

    uri: str

    def check(self) -> None:
        """Fail now, with a StoreError naming the fix, if the store cannot be used."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under key."""

    def read_bytes(self, key: str) -> bytes:
        """Return the object; ArtifactNotFoundError (a StoreError) when there is none."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store data under key; a reader sees the old object or the new one, never a part."""

    def upload_file(self, key: str, path: PathLike) -> None:
        """Store the local file at path under key, atomically."""

    def download_file(self, key: str, path: PathLike) -> None:
        """Copy the object to path (parents created); path never holds a partial file."""

    def list(self, prefix: str = "") -> KeyList:
        """Sorted keys that start with prefix (a plain string prefix, as in S3)."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with prefix; '' empties the store."""

    def size(self, prefix: str) -> int:
        """Bytes stored under keys that start with prefix."""

    def describe(self) -> str:
        """Where the store lives, for error and log messages."""


def _write_atomic(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Let fill write a temp file next to path, sync it and rename it over path; on failure remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalStore(ArtifactStore):
    """Artifacts as files under a local folder (single-machine runs and tests)."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(f"artifact '{key}' not found in {self.describe()}") from exc
        except OSError as exc:
            raise StoreError(f"{action} '{key}' in {self.describe()} failed: {exc}") from exc

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            raise StoreError(f"cannot use {self.describe()} ({exc}): fix it or DISTILL_STORE") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        with self._errors("reading", key):
            return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("writing", key):
            _write_atomic(self._path(key), lambda f: f.write(data))

    def upload_file(self, key: str, path: PathLike) -> None:
        with open(path, "rb") as src, self._errors("uploading to", key):
            _write_atomic(self._path(key), lambda f: shutil.copyfileobj(src, f))

    def download_file(self, key: str, path: PathLike) -> None:
        with self._errors("downloading", key), open(self._path(key), "rb") as src:
            _write_atomic(Path(path), lambda f: shutil.copyfileobj(src, f))

    def list(self, prefix: str = "") -> KeyList:
        start = self.root.joinpath(*check_key(prefix, prefix=True).split("/")[:-1])  # deepest named folder
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                in_flight = name.startswith(".") and name.endswith(_TEMP_SUFFIX)
                if key.startswith(prefix) and not in_flight:
                    keys.append(key)
        return sorted(keys)

    def size(self, prefix: str) -> int:
        return sum(self._path(key).stat().st_size for key in self.list(prefix))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            path = self._path(key)
            with self._errors("deleting", key):
                path.unlink(missing_ok=True)
                for parent in path.parents:  # drop folders the deletion left empty, up to the root
                    if parent == self.root or any(parent.iterdir()):
                        break
                    parent.rmdir()


def s3_client(*, connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 3) -> Any:
    """A boto3 S3 client; endpoint (AWS_ENDPOINT_URL), credentials and region come from AWS_* variables."""
    session = boto3.session.Session()
    # S3-compatible servers (MinIO, Ceph, moto) need path-style addressing, and boto3 >= 1.36 sends CRC
    # checksums by default that several of them reject or store inside the object (boto3#4392, #4435).
    config = Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return session.client("s3", region_name=session.region_name or "us-east-1", config=config)


class S3Store(ArtifactStore):
    """Artifacts as objects under s3://bucket/prefix; the bucket is checked once, on first use."""

    def __init__(
        self, bucket: str, prefix: str = "", client: Any = None, page_size: int = 1000, setting: str = "DISTILL_STORE"
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.setting = setting  # the configuration that chose this location, named in errors
        self.bucket, self.prefix = bucket, check_key(prefix.strip("/"), prefix=True)
        self.client = client if client is not None else s3_client()
        self.endpoint: str = self.client.meta.endpoint_url  # AWS_ENDPOINT_URL or the AWS default
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.page_size, self._bucket_checked = page_size, False

    def describe(self) -> str:
        return f"{self.uri} at {self.endpoint}"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: BaseException, action: str, key: str | None) -> StoreError:
        """Translate a boto3/botocore failure into a StoreError that names the bucket or key and the fix."""
        where = f"s3://{self.bucket}/{self._full(key)}" if key else self.uri
        if isinstance(exc, S3UploadFailedError | RetriesExceededError):  # boto3 wraps the transfer's error
            exc = getattr(exc, "last_exception", None) or exc.__context__ or exc
        if isinstance(exc, ClientError):
            code, message = exc.response["Error"].get("Code", ""), exc.response["Error"].get("Message", "")
            if code == "NoSuchBucket" or (key is None and code in _MISSING):
                return StoreError(
                    f"bucket '{self.bucket}' ({self.setting}) does not exist at {self.endpoint}: "
                    f"create it or fix {self.setting}"
                )
            if exc.response["ResponseMetadata"].get("HTTPStatusCode") == 403 or code == "ExpiredToken":
                return StoreError(
                    f"access to bucket '{self.bucket}' ({self.setting}) was refused ({code}: {message}) while "
                    f"{action} {where}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                )
            if key is not None and code in _MISSING:
                return ArtifactNotFoundError(f"artifact '{key}' not found in {self.describe()}")
            return StoreError(f"S3 error while {action} {where} at {self.endpoint}: {code}: {message}")
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return StoreError(
                f"cannot reach the S3 endpoint {self.endpoint} while {action} {where} ({self.setting}): "
                f"start the server or fix AWS_ENDPOINT_URL ({exc})"
            )
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return StoreError(f"S3 error while {action} {where} at {self.endpoint}: {exc}")

    @contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        try:
            if not self._bucket_checked:
                self.check()
            yield
        except _BOTO_ERRORS as exc:
            raise self._error(exc, action, key) from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _BOTO_ERRORS as exc:
            raise self._error(exc, "checking", None) from exc
        self._bucket_checked = True

    def exists(self, key: str) -> bool:
        try:
            with self._errors("checking", check_key(key)):
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except ArtifactNotFoundError:
            return False

    def read_bytes(self, key: str) -> bytes:
        with self._errors("reading", check_key(key)):
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read())

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("writing", check_key(key)):  # one PUT: S3 never shows a partial object
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def upload_file(self, key: str, path: PathLike) -> None:
        with self._errors("uploading to", check_key(key)):  # a multipart object appears only once complete
            self.client.upload_file(os.fspath(path), self.bucket, self._full(key))

    def download_file(self, key: str, path: PathLike) -> None:
        with self._errors("downloading", check_key(key)):
            _write_atomic(Path(path), lambda f: self.client.download_fileobj(self.bucket, self._full(key), f))

    def _objects(self, prefix: str) -> list[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix), PaginationConfig={"PageSize": self.page_size}
        )
        return [obj for page in pages for obj in page.get("Contents", [])]

    def _list_full(self, prefix: str) -> KeyList:
        return [obj["Key"] for obj in self._objects(prefix)]

    def size(self, prefix: str) -> int:
        with self._errors("listing", check_key(prefix, prefix=True) or None):
            return sum(int(obj["Size"]) for obj in self._objects(prefix))

    def list(self, prefix: str = "") -> KeyList:
        with self._errors("listing", check_key(prefix, prefix=True) or None):
            strip = len(self.prefix) + 1 if self.prefix else 0
            return sorted(full[strip:] for full in self._list_full(prefix))

    def delete_prefix(self, prefix: str) -> None:
        with self._errors("deleting", check_key(prefix, prefix=True) or None):
            full_keys = self._list_full(prefix)
            for start in range(0, len(full_keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = {"Objects": [{"Key": k} for k in full_keys[start : start + 1000]], "Quiet": True}
                errors = self.client.delete_objects(Bucket=self.bucket, Delete=batch).get("Errors")
                if errors:
                    raise StoreError(f"{len(errors)} deletes failed in {self.describe()}: {errors[0]}")


def open_store(uri: str, setting: str = "DISTILL_STORE") -> ArtifactStore:
    """'s3://bucket/prefix' gives an S3Store; a folder path (optionally 'file://...') gives a LocalStore."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} ({setting}) names no bucket: use s3://bucket/prefix")
        return S3Store(bucket, prefix, setting=setting)
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :])
    if "://" in uri:
        raise StoreError(f"store URI {uri!r} has an unknown scheme: use s3://bucket/prefix or a folder path")
    return LocalStore(uri)


def check_locations(locations: dict[str, str]) -> None:
    """Fail before any work, naming the bucket and the setting, if an S3 location cannot be used."""
    for setting, uri in locations.items():
        open_store(uri, setting).check()
