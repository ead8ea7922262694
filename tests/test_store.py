"""The artifact store: one set of behaviour tests for the local folder and for S3 (a real moto server)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import boto3
import pytest

from distill_core.errors import StoreError
from distill_core.store import (
    ArtifactNotFoundError,
    ArtifactStore,
    LocalStore,
    S3Store,
    open_store,
    s3_client,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """The same tests run against a local folder and against s3://<fresh bucket>/runs/demo."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("s3_env"), "runs/demo")


def test_write_then_read_returns_the_same_bytes_and_overwrite_replaces_them(store: ArtifactStore) -> None:
    payload = bytes(range(256)) * 40
    store.write_bytes("students/v1/model.bin", payload)
    assert store.read_bytes("students/v1/model.bin") == payload
    store.write_bytes("students/v1/model.bin", b"v2")
    assert store.read_bytes("students/v1/model.bin") == b"v2"


def test_exists_is_true_only_for_written_keys(store: ArtifactStore) -> None:
    store.write_bytes("soft_labels/part-0.npz", b"labels")
    assert store.exists("soft_labels/part-0.npz")
    assert not store.exists("soft_labels/part-1.npz")
    assert not store.exists("soft_labels")  # a "folder" is not an object


def test_list_gives_sorted_keys_under_a_string_prefix(store: ArtifactStore) -> None:
    for key in ["runs/2/b.bin", "runs/10/c.bin", "runs/1/a.bin", "other/x.bin"]:
        store.write_bytes(key, b".")
    assert store.list("runs/") == ["runs/1/a.bin", "runs/10/c.bin", "runs/2/b.bin"]
    assert store.list("runs/1") == ["runs/1/a.bin", "runs/10/c.bin"]  # S3 semantics: a plain string prefix
    assert store.list() == ["other/x.bin", "runs/1/a.bin", "runs/10/c.bin", "runs/2/b.bin"]
    assert store.list("missing/") == []


def test_upload_then_download_round_trips_a_file(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(os.urandom(300_000))
    store.upload_file("students/v3/checkpoint.pt", source)
    assert store.exists("students/v3/checkpoint.pt")

    target = tmp_path / "downloads" / "nested" / "checkpoint.pt"  # parents do not exist yet
    store.download_file("students/v3/checkpoint.pt", target)
    assert target.read_bytes() == source.read_bytes()
    assert os.listdir(target.parent) == ["checkpoint.pt"]  # no temp file left behind


def test_uploading_a_missing_local_file_is_a_plain_file_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never-written.pt"):
        store.upload_file("students/v3/checkpoint.pt", tmp_path / "never-written.pt")
    assert not store.exists("students/v3/checkpoint.pt")


def test_size_counts_the_bytes_under_a_prefix(store: ArtifactStore) -> None:
    store.write_bytes("labels/a/1.npy", b"x" * 100)
    store.write_bytes("labels/a/2.npy", b"x" * 23)
    store.write_bytes("labels/b/1.npy", b"x" * 7)
    assert (store.size("labels/a/"), store.size("labels/"), store.size("none/")) == (123, 130, 0)


def test_delete_prefix_removes_only_keys_under_it(store: ArtifactStore) -> None:
    for key in ["cache/a/1.bin", "cache/a/2.bin", "cache/ab/3.bin", "keep/4.bin"]:
        store.write_bytes(key, b".")
    store.delete_prefix("cache/a/")
    assert store.list() == ["cache/ab/3.bin", "keep/4.bin"]
    store.delete_prefix("nothing-here/")  # deleting an empty prefix is not an error
    assert store.list() == ["cache/ab/3.bin", "keep/4.bin"]


@pytest.mark.parametrize("bad_key", ["../escape.bin", "a/../../escape.bin", "/etc/passwd", "", "a//b", "./a"])
def test_keys_that_could_escape_the_root_are_rejected(store: ArtifactStore, bad_key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.write_bytes(bad_key, b"x")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.read_bytes(bad_key)
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.exists(bad_key)
    assert store.list() == []
    assert not (tmp_path / "escape.bin").exists()


def test_list_rejects_a_prefix_that_climbs_out(store: ArtifactStore) -> None:
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.list("../")


def test_reading_a_missing_key_names_the_key(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="'students/v9/model.bin' not found") as err:
        store.read_bytes("students/v9/model.bin")
    assert isinstance(err.value, ArtifactNotFoundError)

    target = tmp_path / "out" / "model.bin"
    with pytest.raises(ArtifactNotFoundError, match="students/v9/model.bin"):
        store.download_file("students/v9/model.bin", target)
    assert not target.exists()
    assert not target.parent.exists() or os.listdir(target.parent) == []  # no partial download


# --- local folder: atomic writes ------------------------------------------------------------------


def test_local_write_that_fails_midway_leaves_the_old_object_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    store.write_bytes("students/model.bin", b"old, complete")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new bytes are in the temp file, not yet durable
    with pytest.raises(StoreError, match="No space left on device"):
        store.write_bytes("students/model.bin", b"new, but never committed")
    with pytest.raises(StoreError):
        store.write_bytes("students/fresh.bin", b"never committed either")
    monkeypatch.undo()

    assert store.read_bytes("students/model.bin") == b"old, complete"
    assert not store.exists("students/fresh.bin")
    assert os.listdir(tmp_path / "store" / "students") == ["model.bin"]


def test_local_list_hides_an_in_flight_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("labels/done.npz", b"done")
    (tmp_path / "labels" / ".next.npz.k2j3h4.partial").write_bytes(b"half")  # what a concurrent write leaves
    assert store.list() == ["labels/done.npz"]


def test_local_delete_prefix_removes_emptied_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.write_bytes("cache/run-1/a.bin", b".")
    store.write_bytes("keep.bin", b".")
    store.delete_prefix("cache/")
    assert sorted(os.listdir(tmp_path / "store")) == ["keep.bin"]


# --- S3 specifics -----------------------------------------------------------------------------------


def test_s3_keys_live_under_the_store_prefix(s3_env: str) -> None:
    store = S3Store(s3_env, "runs/demo")
    store.write_bytes("model.bin", b"m")
    store.client.put_object(Bucket=s3_env, Key="runs/demo-other/x.bin", Body=b"x")  # a sibling prefix
    raw = [obj["Key"] for obj in store.client.list_objects_v2(Bucket=s3_env)["Contents"]]
    assert sorted(raw) == ["runs/demo-other/x.bin", "runs/demo/model.bin"]
    assert store.list() == ["model.bin"]
    assert store.uri == f"s3://{s3_env}/runs/demo"


def test_s3_list_and_delete_follow_every_page(s3_env: str) -> None:
    store = S3Store(s3_env, "paged", page_size=2)  # a small page stands in for S3's 1000-key pages
    keys = [f"shard-{i:02d}.bin" for i in range(5)]
    for key in reversed(keys):
        store.write_bytes(key, b".")
    list_calls: list[str] = []
    store.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: list_calls.append("call"))
    assert store.list() == keys
    assert len(list_calls) == 3  # 2 + 2 + 1
    store.delete_prefix("")
    assert store.list() == []


def test_s3_missing_bucket_error_names_bucket_endpoint_and_fix(s3_env: str, s3_server) -> None:
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    store = S3Store(missing)
    with pytest.raises(StoreError) as err:
        store.check()
    assert str(err.value) == (
        f"bucket '{missing}' (DISTILL_STORE) does not exist at {s3_server.endpoint_url}: create it or fix DISTILL_STORE"
    )
    with pytest.raises(StoreError, match=f"bucket '{missing}' \\(DISTILL_STORE\\) does not exist"):
        store.exists("model.bin")  # checked on first use: a bare 404 on HEAD would look like "no such key"


def test_s3_upload_into_a_bucket_deleted_mid_run_names_the_bucket(s3_env: str, tmp_path: Path) -> None:
    store = S3Store(s3_env, "runs")
    store.check()
    store.client.delete_bucket(Bucket=s3_env)  # e.g. a cleanup job; boto3 wraps this upload's error
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(b"weights")
    with pytest.raises(StoreError, match=f"bucket '{s3_env}' \\(DISTILL_STORE\\) does not exist .*fix DISTILL_STORE"):
        store.upload_file("checkpoint.pt", source)


def test_s3_unreachable_endpoint_error_names_the_endpoint(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a loopback port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    store = S3Store(s3_env, client=s3_client(connect_timeout=1, max_attempts=1))
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint {closed} .*fix AWS_ENDPOINT_URL"):
        store.write_bytes("model.bin", b"m")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("case", ["unknown key id", "wrong secret", "user without permissions"])
def test_s3_refused_credentials_error_names_bucket_and_fix(
    s3_env: str, s3_server, credentials_enforced, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    user = f"distill-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    access_key = iam.create_access_key(UserName=user)["AccessKey"]
    key_id, secret = {
        "unknown key id": ("AKIAUNKNOWNUNKNOWN00", "whatever"),
        "wrong secret": (access_key["AccessKeyId"], "not-the-secret"),
        "user without permissions": (access_key["AccessKeyId"], access_key["SecretAccessKey"]),
    }[case]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = S3Store(s3_env, client=s3_client(max_attempts=1))

    with credentials_enforced(), pytest.raises(StoreError) as err:
        store.read_bytes("model.bin")
    message = str(err.value)
    assert f"access to bucket '{s3_env}' (DISTILL_STORE) was refused (403" in message
    assert message.endswith("check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")


def test_s3_refused_error_carries_the_server_code_when_it_sends_one(
    s3_env: str, s3_server, credentials_enforced, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3Store(s3_env, "runs")
    store.check()  # the bucket check passes with the right keys; the key is then revoked
    store.client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="AKIAREVOKEDREVOKED00",
        aws_secret_access_key="x",
    )
    with credentials_enforced(), pytest.raises(StoreError) as err:
        store.read_bytes("model.bin")  # a GET, unlike HEAD, has a body with the error code
    assert f"access to bucket '{s3_env}' (DISTILL_STORE) was refused (InvalidAccessKeyId:" in str(err.value)
    assert f"s3://{s3_env}/runs/model.bin" in str(err.value)


# --- open_store -------------------------------------------------------------------------------------


def test_open_store_picks_the_backend_from_the_uri(tmp_path: Path) -> None:
    s3 = open_store("s3://artifacts/distill/prod")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("artifacts", "distill/prod", "s3://artifacts/distill/prod")

    for uri in (str(tmp_path), f"file://{tmp_path}"):
        local = open_store(uri)
        assert isinstance(local, LocalStore)
        assert local.root == tmp_path
        assert open_store(local.uri).uri == local.uri


@pytest.mark.parametrize("uri", ["s3://", "gs://bucket/prefix"])
def test_open_store_rejects_uris_it_cannot_serve(uri: str) -> None:
    with pytest.raises(StoreError, match="store URI"):
        open_store(uri)
