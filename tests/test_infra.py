"""infra/: the compose file validates with docker-compose itself, and it configures the pipeline's processes
with the same variables as the topology the tests start (tests/stack.py); prefect.yaml names real flows."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from stack import Stack

from flows.distill import AUTO, distill_teacher_version, watch_teachers

INFRA = Path(__file__).resolve().parents[1] / "infra"
COMPOSE = INFRA / "docker-compose.yml"


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs Debian's docker-compose package")
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    return found


def compose_config(*env_file: str) -> dict:
    done = subprocess.run(
        [docker_compose(), *env_file, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_the_compose_file_validates_as_the_readme_says() -> None:
    done = subprocess.run([docker_compose(), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_compose_topology_has_every_part_wired_to_postgres_and_s3() -> None:
    services = compose_config("--env-file", str(INFRA / ".env.example"))["services"]
    assert set(services) == {"postgres", "minio", "minio-buckets", "mlflow", "prefect-server", "deploy",
                             "prefect-worker", "receiver", "dask-scheduler", "dask-worker"}  # fmt: skip
    mlflow_cmd = services["mlflow"]["command"]  # docker-compose 1.29 keeps a string command a string
    assert "postgresql://distill:change-me@postgres:5432/mlflow" in mlflow_cmd  # the .env file's password
    assert "--artifacts-destination s3://mlflow-artifacts" in mlflow_cmd
    assert (
        services["mlflow"]["environment"]["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]
        == "replace-with-a-generated-fernet-key"
    )
    assert services["receiver"]["environment"]["DISTILL_WEBHOOK_SECRET"] == "replace-with-a-long-random-string"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    receiver = services["receiver"]
    assert "--deployment auto" in receiver["command"]
    # soft labels on Dask: the flow runs send shards to the scheduler, whose workers reach MLflow, S3 and Prefect
    assert services["prefect-worker"]["environment"]["DISTILL_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
    assert "tcp://dask-scheduler:8786" in services["dask-worker"]["command"]
    assert "--nthreads 1" in services["dask-worker"]["command"]
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DISTILL_STORE", "AWS_ENDPOINT_URL"):
        assert services["dask-worker"]["environment"][name] == services["prefect-worker"]["environment"][name]


def test_compose_and_the_tested_topology_configure_the_pipeline_alike(tmp_path: Path) -> None:
    services = compose_config()["services"]
    tested = Stack(tmp_path, tmp_path / "recipe.yaml", "secret").distill_env
    for name in ("prefect-worker", "receiver"):
        pipeline_vars = {
            k for k in services[name]["environment"] if k.startswith(("MLFLOW_", "DISTILL_", "PREFECT_API"))
        }
        assert pipeline_vars <= set(tested), (
            f"{name} sets {pipeline_vars - set(tested)}, which the test never exercises"
        )


def test_prefect_yaml_deploys_the_pipelines_flows_with_limits() -> None:
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    flows = {"distill-teacher-version": distill_teacher_version, "watch-teachers": watch_teachers}
    for name, flow in flows.items():
        path, _, function = deployments[name]["entrypoint"].partition(":")
        assert (INFRA.parent / path).is_file() and flow.fn.__name__ == function
        assert flow.name == name and deployments[name]["concurrency_limit"]["limit"] == 1
    assert deployments["watch-teachers"]["schedules"][0]["interval"] > 0
    assert deployments["watch-teachers"]["parameters"]["deployment"] == AUTO


def test_every_distillation_deployment_names_the_teacher_and_student_of_its_own_recipe() -> None:
    """The receiver and the watcher find the deployments by their teacher:/student: tags; each must say what its
    DISTILL_RECIPE distills, or the runs it gets are refused."""
    from distill_core.recipe import load_recipe

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    distilling = [d for d in spec["deployments"] if d["entrypoint"].endswith(":distill_teacher_version")]
    assert distilling
    for deployment in distilling:
        recipe = load_recipe(INFRA.parent / deployment["work_pool"]["job_variables"]["env"]["DISTILL_RECIPE"])
        tags = dict(tag.split(":", 1) for tag in deployment["tags"] if ":" in tag)
        assert tags == {"teacher": recipe.teacher.registered_name, "student": recipe.student_registered_name}


def test_the_benchmark_script_imports_what_the_core_has_today():
    """`make bench` is not part of the suite; a core change that breaks its imports (as a moved function once did)
    must still fail here, not on the next bench run."""
    import sys

    root = INFRA.parent
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "run_bench.py"), "--help"], capture_output=True, text=True, cwd=root
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--only" in out.stdout


# --- Kubernetes: the same topology as plain manifests and a kubernetes work pool ---------------------------------

K8S = INFRA / "k8s"
KUBERNETES = "1.33"  # the schemas the manifests are checked against (kubernetes-validate ships them)


def _manifests() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all((K8S / "distill.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_kubernetes_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    manifests = _manifests()
    for doc in manifests.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises, naming the field, on any error
    broken = copy.deepcopy(manifests[("Deployment", "dask-worker")])
    broken["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"configMap": {"name": "distill-env"}}]
    with pytest.raises(kubernetes_validate.ValidationError, match="configMap"):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_kubernetes_topology_is_wired_like_the_compose_one() -> None:
    manifests, services = _manifests(), compose_config("--env-file", str(INFRA / ".env.example"))["services"]
    env = {**manifests[("ConfigMap", "distill-env")]["data"], **manifests[("Secret", "distill-secrets")]["stringData"]}
    compose_env = services["prefect-worker"]["environment"]
    assert {k for k in compose_env if k.startswith(("MLFLOW_", "DISTILL_", "PREFECT_API", "AWS_"))} - {
        "PREFECT_WORKER_QUERY_SECONDS"
    } <= set(env)
    scheduler = manifests[("Service", "dask-scheduler")]
    port = next(p["port"] for p in scheduler["spec"]["ports"] if p["name"] == "scheduler")
    assert env["DISTILL_DASK_ADDRESS"] == f"tcp://dask-scheduler:{port}"
    for name in ("dask-worker", "prefect-worker", "distill-receiver"):
        container = manifests[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
        assert {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]} == {
            "distill-env",
            "distill-secrets",
        }, name
    worker = manifests[("Deployment", "dask-worker")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert env["DISTILL_DASK_ADDRESS"] in worker and worker[worker.index("--nthreads") + 1] == "1"
    pool = manifests[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    role = manifests[("Role", "prefect-worker")]
    assert pool["serviceAccountName"] == "prefect-worker" and "jobs" in role["rules"][0]["resources"]


def test_the_kubernetes_deployments_are_the_process_pools_on_a_kubernetes_pool() -> None:
    process = {d["name"]: d for d in yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]}
    spec = yaml.safe_load((K8S / "prefect.yaml").read_text())
    kubernetes = {d["name"]: d for d in spec["deployments"]}
    assert set(kubernetes) == set(process)
    pool = _manifests()[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]["command"]
    for name, deployment in kubernetes.items():
        same = ("entrypoint", "tags", "concurrency_limit", "parameters", "schedules")
        assert {k: deployment.get(k) for k in same} == {k: process[name].get(k) for k in same}, name
        assert deployment["work_pool"]["name"] == pool[pool.index("--pool") + 1]
        assert deployment["work_pool"]["job_variables"]["image"] == "continuous-distill:latest"
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"  # the WORKDIR
    assert "WORKDIR /app" in (INFRA / "Dockerfile").read_text()


def test_the_image_starts_dask_workers_as_a_local_cluster_does() -> None:
    """The image's Dask config (infra/dask.yaml, in /etc/dask) unsets what DISTILL_DASK=local unsets for its workers."""
    import dask

    from distill_core.sharding import FAST_MALLOC

    assert "cp infra/dask.yaml /etc/dask/" in (INFRA / "Dockerfile").read_text()
    image = dask.config.collect(paths=[str(INFRA / "dask.yaml")], env={})
    for key, value in FAST_MALLOC.items():
        section: dict = image
        for part in key.split(".")[:-1]:
            section = section[part]
        assert section[key.split(".")[-1]] == value, key
