"""What a person sees, in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, which
.ci/run installs) on a real `mlflow server` and a real `prefect server` with its UI, after a two-version run.
Screenshots stay in the test's temporary folder; a failed check names the one it took."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from stack import NO_PROXY, free_port, wait_for
from toy_models import register_toy_teacher

from distill_core import links, names
from distill_core.registry import CHALLENGER, CHAMPION

BIN = Path(sys.executable).parent
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _missing_browser() -> str | None:
    if CHROMIUM and DRIVER:
        return None
    why = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        raise RuntimeError(f"{why}: .ci/run installs them")
    return why


pytestmark = pytest.mark.skipif(_missing_browser() is not None, reason=str(_missing_browser()))


def _spawn(name: str, argv: list[str], env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    with (root / f"{name}.log").open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_answering(name: str, proc: subprocess.Popen[bytes], health: str, root: Path) -> None:
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{(root / f'{name}.log').read_text()[-3000:]}")
        try:
            NO_PROXY.open(health, timeout=2).close()
            return True
        except OSError:
            return False

    wait_for(answers, 120, f"{name} at {health}", every=0.3)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`mlflow server` on SQLite with proxied artifacts, and `prefect server` with its UI, on loopback."""
    ports = {"mlflow": str(free_port()), "prefect": str(free_port())}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    base.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    prefect_env = {
        **base,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"{urls['prefect']}/api",  # where the UI in the browser finds its API (not :4200)
    }
    prefect_argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", ports["prefect"]]
    mlflow_argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", ports["mlflow"],
                   "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--artifacts-destination", (tmp_path / "artifacts").as_uri()]  # fmt: skip
    procs = {}
    try:  # both start (and migrate their databases) side by side
        procs["prefect"] = _spawn("prefect", prefect_argv, prefect_env, tmp_path)
        procs["mlflow"] = _spawn("mlflow", mlflow_argv, base, tmp_path)
        _wait_answering("mlflow", procs["mlflow"], f"{urls['mlflow']}/health", tmp_path)
        _wait_answering("prefect", procs["prefect"], f"{urls['prefect']}/api/health", tmp_path)
        yield urls
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """Open a URL, wait until the rendered text shows what a person looks for, keep a screenshot of it."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver, self.shots = driver, shots
        shots.mkdir(parents=True, exist_ok=True)

    def shows(self, url: str, shot: str, *texts: str, timeout: float = 45) -> str:
        self.driver.get(url)
        return self._wait(url, shot, texts, timeout)

    def click_then_shows(self, xpath: str, shot: str, *texts: str, timeout: float = 45) -> str:
        """Click what `xpath` finds (a tab, a link) once it is there, then wait as `shows` does."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        where = self.driver.current_url
        WebDriverWait(self.driver, timeout).until(
            expected_conditions.element_to_be_clickable((By.XPATH, xpath))
        ).click()
        return self._wait(f"{xpath} on {where}", shot, texts, timeout)

    def _wait(self, url: str, shot: str, texts: tuple[str, ...], timeout: float) -> str:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = self.driver
        path = self.shots / f"{shot}.png"

        def body() -> str:
            return driver.find_element(By.TAG_NAME, "body").text

        try:
            WebDriverWait(driver, timeout).until(lambda _: all(t in body() for t in texts))
        except TimeoutException:
            driver.save_screenshot(str(path))
            missing = [t for t in texts if t not in body()]
            pytest.fail(f"{url} never showed {missing} (screenshot: {path}); it showed:\n{body()[:3000]}")
        driver.save_screenshot(str(path))
        return body()


def test_a_person_finds_the_decision_the_evidence_and_the_run_in_the_mlflow_and_prefect_uis(
    servers, browser, small_dataset, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from flows.distill import distill_teacher_version

    suffix = uuid.uuid4().hex[:6]
    env = {"teacher": f"ui-teacher-{suffix}", "tracking_uri": servers["mlflow"], "tmp": tmp_path, "artifacts": None}
    student = f"ui-student-{suffix}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "ui",
                "student_registered_name": student,
                "data": {"max_rows": 300, "augment_copies": 1},
                "teacher": {"registered_name": env["teacher"]},
                "students": [{"name": "bag", "family": "embedding_bag", "buckets": 2048, "dim": 8, "lr": 0.1}],
                "train": {"epochs": 3, "batch_size": 32, "eval_every": 100},
                "evaluation": {"latency_samples": 10, "throughput_batch": 8, "hard_label_baseline": False},
                "gates": {"min_retention": 0.5, "max_param_ratio": 10.0, "max_regression": 0.2},
            }
        )
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["mlflow"])
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    for name in ("DISTILL_STORE", "DISTILL_LEDGER_URI"):
        monkeypatch.delenv(name, raising=False)
    results = []
    with temporary_settings({PREFECT_API_URL: f"{servers['prefect']}/api"}):  # the UI's URL follows from it
        for _ in range(2):  # the same teacher twice: v2's student is the challenger, not the champion
            version = register_toy_teacher(env, small_dataset)
            results.append(distill_teacher_version(env["teacher"], version, str(recipe), str(tmp_path / "home")))
    assert [r["alias"] for r in results] == [CHAMPION, CHALLENGER]
    client = MlflowClient(servers["mlflow"])
    second = client.get_model_version(student, results[1]["student_version"])
    parent = client.get_run(second.tags["distill.run_id"])
    page, ui = Page(browser, tmp_path / "screenshots"), servers["mlflow"]

    page.shows(links.model(ui, student), "student-model", "@ champion", "@ challenger", "distill promote")
    page.shows(links.model_version(ui, student, second.version), "student-version", "does not beat champion v1")
    experiment = parent.info.experiment_id
    page.shows(links.experiment(ui, experiment), "experiment-runs", f"{env['teacher']}-v2")
    text = page.shows(
        links.run(ui, experiment, parent.info.run_id),
        "parent-run",
        f"Student v{second.version} (bag)",
        "does not beat champion v1",
    )
    assert "challenger" in text
    logged = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="data_docs",
                                                 dst_path=str(tmp_path / "downloaded"), tracking_uri=ui)  # fmt: skip
    docs = Path(logged) / "index.html"  # the site as a person downloads it from the run, opened offline
    text = page.shows(docs.as_uri(), "data-docs", "Data docs: validation results", "dataset.train", "soft_labels")
    assert "FAILED" not in text

    flow_run = parent.data.tags[names.PREFECT_FLOW_RUN_ID]
    assert parent.data.tags[names.PREFECT_FLOW_RUN_URL] == f"{servers['prefect']}/flow-runs/flow-run/{flow_run}"
    artifact = f"distill-{env['teacher']}-v2"
    page.shows(parent.data.tags[names.PREFECT_FLOW_RUN_URL], "prefect-flow-run", "distill-teacher-version", "Completed")
    page.click_then_shows("(//*[normalize-space(.)='Artifacts'])[last()]", "prefect-flow-run-artifacts", artifact)
    page.shows(f"{servers['prefect']}/artifacts/key/{artifact}", "prefect-artifact-versions", artifact)
    page.click_then_shows(
        "//a[contains(@href, '/artifacts/artifact/')]", "prefect-artifact", "does not beat champion v1"
    )
    run_page = links.run(ui, experiment, parent.info.run_id)
    linked = browser.find_elements(By.CSS_SELECTOR, f"a[href='{run_page}']")
    assert linked, f"the Prefect artifact does not link to {run_page}"
    page.shows(links.run(ui, experiment, parent.info.run_id, "data_docs/index.html"), "run-data-docs", "index.html")
    # the UI shows the page in a frame of its own
    WebDriverWait(browser, 45).until(
        expected_conditions.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe"))
    )
    WebDriverWait(browser, 45).until(lambda d: "validation results" in d.find_element(By.TAG_NAME, "body").text)
    browser.switch_to.default_content()
