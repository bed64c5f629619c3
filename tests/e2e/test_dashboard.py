"""The dashboard, in a real headless Chromium, against a real stack run as processes.

Results, producer and a worker run as in test_cli.py (private Redis and PostgreSQL), plus the
dashboard process (`python -m conveyor.dashboard`) and, for read-only mode, a second one with
CONVEYOR_DASHBOARD_READ_ONLY=1. Jobs are enqueued with the `conveyor` CLI; selenium drives
Debian's chromium through chromedriver, and every wait is on the DOM with a deadline.
Screenshots go to CONVEYOR_SCREENSHOTS_DIR when set (docs/screenshots is made that way).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from conveyor.common.devstack.servers import PostgresServer, RedisServer, free_port
from tests.support.databases import fresh_database
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian's chromium and chromium-driver (deploy/local/install-system-deps.sh)",
    ),
]

CONVEYOR = str(Path(sys.executable).with_name("conveyor"))
QUEUE = "dash"
DLQ_QUEUE = "dash-dlq"
WAIT = 30.0


class Dashboard:
    """One dashboard process, serving HTTP on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="conveyor-dashboard-", suffix=".log")[1])
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "conveyor.dashboard"],
                env={**env, "CONVEYOR_DASHBOARD_ADDR": f"127.0.0.1:{self.port}", "CONVEYOR_LOG_FORMAT": "json"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._answers, f"the dashboard on {self.url}", within=WAIT)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dashboard exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Stack:
    env: dict[str, str]
    dashboard: Dashboard

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([CONVEYOR, *args], env=self.env, capture_output=True, text=True, timeout=60)
        return done

    def json(self, *args: str) -> dict[str, object]:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        value = json.loads(done.stdout)
        assert isinstance(value, dict)
        return value

    def enqueue(self, type_: str, payload: dict[str, object], queue: str = QUEUE) -> str:
        done = self.cli("enqueue", type_, "--queue", queue, "--payload", json.dumps(payload))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def state(self, job_id: str) -> str:
        return str(self.json("get", job_id)["state"]).removeprefix("JOB_STATE_")


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer) -> Iterator[Stack]:
    database_url = fresh_database(pg_server, "dash")
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url}
        processes: list[ServiceProcess] = []
        dashboard: Dashboard | None = None
        try:
            results = ServiceProcess("results", {**common, "DATABASE_URL": database_url}).start()
            processes.append(results)
            producer = ServiceProcess("producer", {**common, "CONVEYOR_RESULTS_ADDR": results.addr}).start()
            processes.append(producer)
            worker_env = {**common, "CONVEYOR_QUEUES": f"{QUEUE},{DLQ_QUEUE}", "CONVEYOR_WORKER_ID": "dash-worker"}
            processes.append(ServiceProcess("worker", worker_env).start())
            env = {
                **os.environ,
                "CONVEYOR_PRODUCER_ADDR": producer.addr,
                "CONVEYOR_RESULTS_ADDR": results.addr,
                "NO_COLOR": "1",
                "COLUMNS": "200",
            }
            dashboard = Dashboard(env)
            yield Stack(env, dashboard)
        finally:
            if dashboard is not None:
                dashboard.stop()
            for p in reversed(processes):
                p.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, within: float = WAIT) -> WebDriverWait[WebDriver]:
    # A page that redraws while a condition reads it detaches the node: Chrome then answers "Node
    # with given id does not belong to the document" (a plain WebDriverException, not a stale
    # element). Polling again finds the new node; a condition never met still fails at the deadline.
    return WebDriverWait(driver, within, poll_frequency=0.05, ignored_exceptions=(WebDriverException,))


def screenshot(driver: WebDriver, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("CONVEYOR_SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}},
    )
    (folder / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


def text_of(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def row_limits(stack: Stack, browser: WebDriver) -> str:
    browser.get(stack.dashboard.url + "/")
    return text_of(browser, f'tr[data-queue="{QUEUE}"] .limits')


def test_overview_lists_every_queue_with_its_counts(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    done = stack.enqueue("demo.echo", {"hello": "dashboard"})
    assert stack.cli("watch", done).returncode == 0
    stack.enqueue("demo.sleep", {"seconds": 0}, queue=DLQ_QUEUE)
    browser.get(stack.dashboard.url + "/")
    row = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-queue="{QUEUE}"]')))
    assert "running" in row.find_element(By.CSS_SELECTOR, ".status").text
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-queue="{DLQ_QUEUE}"]')
    row.find_element(By.LINK_TEXT, QUEUE).click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "queue-status"), "running"))
    assert text_of(browser, "#limits-summary") == "none"
    assert row_limits(stack, browser) == "none"
    browser.get(stack.dashboard.url + "/")
    wait(browser).until(ec.presence_of_element_located((By.ID, "queues")))
    screenshot(browser, "overview", tmp_path)


def test_a_job_goes_from_queued_to_succeeded_live_without_a_reload(
    stack: Stack, browser: WebDriver, tmp_path: Path
) -> None:
    # Paused, the queue holds the job QUEUED until the page is open and watching: no race with the worker.
    assert stack.cli("pause", QUEUE).returncode == 0
    try:
        job_id = stack.enqueue("demo.sleep", {"seconds": 1.2, "steps": 4, "secret": "s3"})
        browser.get(f"{stack.dashboard.url}/jobs/{job_id}")
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "job-state"), "QUEUED"))
        wait(browser).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-watching") == "true")
        browser.execute_script("window.conveyorNoReload = 'still here';")
        assert "s3" not in browser.page_source  # the payload stays hidden until asked for
    finally:
        assert stack.cli("resume", QUEUE).returncode == 0

    seen_states: set[str] = set()

    def reached_succeeded(driver: WebDriver) -> bool:
        state = str(driver.find_element(By.ID, "job-state").text)
        seen_states.add(state)
        return state == "SUCCEEDED"

    wait(browser).until(reached_succeeded)
    assert browser.execute_script("return window.conveyorNoReload") == "still here"
    types = [r.get_attribute("data-type") for r in browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")]
    assert types[0] == "QUEUED" and "ACTIVE" in types and types[-1] == "SUCCEEDED"
    assert types.count("PROGRESS") == 4
    assert browser.find_element(By.ID, "job-progress").get_attribute("value") == "100"
    assert text_of(browser, "#job-progress-message") == "step 4 of 4"
    assert text_of(browser, "#job-worker") == "dash-worker" and text_of(browser, "#job-started").startswith("20")
    assert '"slept":1.2' in text_of(browser, "#job-result").replace(" ", "")

    browser.find_element(By.ID, "show-payload").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "payload"), '"secret": "s3"'))
    screenshot(browser, "job", tmp_path)


def test_cancel_a_waiting_job_from_its_page(stack: Stack, browser: WebDriver) -> None:
    assert stack.cli("pause", QUEUE).returncode == 0
    try:
        job_id = stack.enqueue("demo.echo", {"never": "runs"})
        browser.get(f"{stack.dashboard.url}/jobs/{job_id}")
        wait(browser).until(ec.element_to_be_clickable((By.ID, "cancel"))).click()
        wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
        browser.find_element(By.ID, "confirm-ok").click()
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "job-state"), "CANCELLED"))
        assert not browser.find_elements(By.ID, "cancel")
        assert stack.state(job_id) == "CANCELLED"
        status, answer = stack.dashboard.post(f"/jobs/{job_id}/cancel", {})
        assert (status, answer) == (200, {"state": "CANCELLED"})  # cancelling again changes nothing
    finally:
        assert stack.cli("resume", QUEUE).returncode == 0


def test_jobs_filter_by_state_and_page(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    failed = stack.enqueue("demo.fail", {"message": "filtered out?", "permanent": True})
    succeeded = stack.enqueue("demo.echo", {"n": 1})
    assert stack.cli("watch", failed).returncode == 3
    assert stack.cli("watch", succeeded).returncode == 0
    wait_until(lambda: stack.json("jobs", "--queue", QUEUE).get("jobs"), "history of the jobs", within=WAIT)

    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}")
    wait(browser).until(ec.presence_of_element_located((By.ID, "jobs")))
    Select(browser.find_element(By.ID, "filter-state")).select_by_value("FAILED")
    browser.find_element(By.ID, "apply-filters").click()
    wait(browser).until(lambda d: "state=FAILED" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    ids = {r.get_attribute("data-job-id") for r in rows}
    assert failed in ids and succeeded not in ids
    assert {r.get_attribute("data-state") for r in rows} == {"FAILED"}

    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&state=SUCCEEDED")
    rows = browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    assert succeeded in {r.get_attribute("data-job-id") for r in rows}
    screenshot(browser, "jobs", tmp_path)

    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&type=demo.fail&created_after=2020-01-01T00:00")
    ids = {r.get_attribute("data-job-id") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")}
    assert failed in ids and succeeded not in ids
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&created_after=2999-01-01T00:00")
    assert browser.find_elements(By.ID, "no-jobs")
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&created_before=2020-01-01T00:00:00Z")
    assert browser.find_elements(By.ID, "no-jobs")

    # Keyset paging: page_size is 50, so 51 more jobs make a second page that goes on where the first stopped.
    for i in range(51):
        stack.enqueue("demo.echo", {"page": i})
    wait_until(
        lambda: (
            len(stack.json("jobs", "--queue", QUEUE, "--state", "succeeded", "--limit", "60").get("jobs", []))  # type: ignore[arg-type]
            >= 53
        ),
        "53 succeeded jobs in history",
        within=60,
    )
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&state=SUCCEEDED")
    first = [r.get_attribute("data-job-id") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")]
    assert len(first) == 50
    browser.find_element(By.ID, "next-page").click()
    wait(browser).until(lambda d: "page_token=" in d.current_url)
    second = [r.get_attribute("data-job-id") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")]
    assert second and not set(first) & set(second)

    browser.get(stack.dashboard.url + "/jobs?state=NOPE")
    assert "state" in text_of(browser, "#error-message") and "INVALID_ARGUMENT" in text_of(browser, "#error-message")


def test_jobs_filter_by_payload_fields_and_labels(stack: Stack, browser: WebDriver) -> None:
    # Only this test's jobs carry it. Not bare hex: "where" reads "8e870111" as a number (an
    # infinite one, refused) and "12345678" as one too, which no string payload value equals.
    run = f"run-{uuid.uuid4().hex[:8]}"

    def enqueue(payload: dict[str, object], team: str) -> str:
        done = stack.cli(
            "enqueue", "demo.echo", "-q", QUEUE, "-p", json.dumps({"run": run, **payload}), "--label", f"team={team}"
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    big = enqueue({"customer": {"id": 42}, "order": {"total": 250}}, "billing")
    small = enqueue({"customer": {"id": 42}, "order": {"total": 20}}, "ops")
    other = enqueue({"customer": {"id": 7}, "order": {"total": 300}}, "billing")
    for job_id in (big, small, other):
        assert stack.cli("watch", job_id).returncode == 0
    wait_until(
        lambda: len(stack.json("jobs", "-q", QUEUE, "--where", f"run={run}").get("jobs", [])) == 3,  # type: ignore[arg-type]
        "the three jobs recorded with their payloads",
        within=WAIT,
    )

    def shown() -> set[str | None]:
        return {r.get_attribute("data-job-id") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")}

    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&where=run%3D{run}")
    wait(browser).until(ec.presence_of_element_located((By.ID, "jobs")))
    assert shown() == {big, small, other}
    browser.find_element(By.ID, "filter-where-new").send_keys("customer.id=42")
    browser.find_element(By.ID, "apply-filters").click()
    wait(browser).until(lambda d: "customer.id" in d.current_url)
    assert shown() == {big, small}
    # The conditions stay in the form; add a range on another field and a label.
    values = [e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, "input.filter-where")]
    assert values == [f"run={run}", "customer.id=42", ""]
    browser.find_element(By.ID, "filter-where-new").send_keys("order.total>=100")
    browser.find_element(By.ID, "filter-label-new").send_keys("team=billing")
    browser.find_element(By.ID, "apply-filters").click()
    wait(browser).until(lambda d: "team" in d.current_url)
    assert shown() == {big}
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&where=run%3D{run}&label=team%3Dops")
    assert shown() == {small}
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&where=run%3D{run}&where=customer.vip%3Dtrue")
    assert browser.find_elements(By.ID, "no-jobs")
    # A condition that is not one, or one the service refuses: a page naming the field, no listing.
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&where=nonsense")
    assert "where" in text_of(browser, "#error-message") and "INVALID_ARGUMENT" in text_of(browser, "#error-message")
    browser.get(stack.dashboard.url + f"/jobs?queue={QUEUE}&where=order.total%3Ctrue")
    assert "where[0].value" in text_of(browser, "#error-message")


def test_bulk_retry_of_dead_letters_asks_first(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    poison = {"message": "poison", "permanent": True}
    dead = [stack.enqueue("demo.fail", poison, queue=DLQ_QUEUE) for _ in range(3)]
    for job_id in dead:
        assert stack.cli("watch", job_id).returncode == 3
    # Paused, the retried jobs stay QUEUED where the test can see them.
    assert stack.cli("pause", DLQ_QUEUE).returncode == 0
    try:
        browser.get(f"{stack.dashboard.url}/queues/{DLQ_QUEUE}/dead-letters")
        rows = wait(browser).until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#dead-letters tbody tr")))
        assert {r.get_attribute("data-job-id") for r in rows} == set(dead)
        assert {r.find_element(By.CSS_SELECTOR, ".attempt").text for r in rows} == {"1"}
        screenshot(browser, "dead-letters", tmp_path)

        browser.find_element(By.ID, "retry-all").click()
        dialog = wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
        assert "Retry every dead letter" in dialog.text
        browser.find_element(By.ID, "confirm-cancel").click()
        wait(browser).until(ec.invisibility_of_element_located((By.ID, "confirm")))
        assert len(stack.json("dlq", "list", DLQ_QUEUE)["deadLetters"]) == 3  # type: ignore[arg-type]

        browser.find_element(By.ID, "retry-all").click()
        wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
        browser.find_element(By.ID, "confirm-ok").click()
        wait(browser).until(ec.presence_of_element_located((By.ID, "no-dead-letters")))
        assert "Retry all: done" in text_of(browser, "#flash")
        assert stack.json("dlq", "list", DLQ_QUEUE) == {}
        assert {stack.state(j) for j in dead} == {"QUEUED"}
    finally:
        assert stack.cli("resume", DLQ_QUEUE).returncode == 0


def test_pause_and_resume_a_queue_from_its_page(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    assert stack.cli("limits", "set-concurrency", QUEUE, "7").returncode == 0
    assert stack.cli("limits", "set-rate", QUEUE, "100", "1s", "--each-key").returncode == 0
    assert row_limits(stack, browser) == "at most 7 running, each key 100 per 1 s"
    browser.get(f"{stack.dashboard.url}/queues/{QUEUE}")
    assert text_of(browser, "#limits-summary") == "at most 7 running, each key 100 per 1 s"
    wait(browser).until(ec.element_to_be_clickable((By.ID, "pause"))).click()
    wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "queue-status"), "paused"))
    assert stack.json("stats", QUEUE)["stats"]["paused"] is True  # type: ignore[index]

    wait(browser).until(ec.element_to_be_clickable((By.ID, "resume"))).click()  # resuming asks nothing
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "queue-status"), "running"))
    assert stack.json("stats", QUEUE)["stats"].get("paused", False) is False  # type: ignore[attr-defined]
    wait(browser).until(lambda d: d.find_element(By.ID, "throughput").get_attribute("data-drawn") == "true")
    screenshot(browser, "queue", tmp_path)
    browser.get(stack.dashboard.url + "/")
    screenshot(browser, "overview", tmp_path)


def test_workers_and_schedules(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    created = stack.cli("schedules", "create", "dash-nightly", "demo.echo", "--queue", QUEUE, "--cron", "0 3 * * *")
    assert created.returncode == 0, created.stderr
    browser.get(stack.dashboard.url + "/schedules")
    row = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-schedule-id="dash-nightly"]')))
    assert "cron 0 3 * * *" in row.text
    screenshot(browser, "schedules", tmp_path)

    row.find_element(By.CSS_SELECTOR, "button.run-now").click()
    wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    flash = wait(browser).until(ec.visibility_of_element_located((By.ID, "flash")))
    fired = json.loads(flash.text.split("done ", 1)[1])["job_id"]
    assert fired.startswith(f"{QUEUE}/")
    assert stack.cli("watch", fired).returncode == 0

    browser.find_element(By.CSS_SELECTOR, 'tr[data-schedule-id="dash-nightly"] button.delete').click()
    wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "Delete: done"))
    assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-schedule-id="dash-nightly"]')
    assert stack.cli("schedules", "get", "dash-nightly").returncode == 1

    running = stack.enqueue("demo.sleep", {"seconds": 120, "steps": 120})
    try:
        wait_until(lambda: stack.state(running) == "ACTIVE", "the long job to start", within=WAIT)

        def shows_running_job() -> bool:
            browser.get(stack.dashboard.url + "/workers")
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-worker-id="dash-worker"]')
            assert QUEUE in row.text and DLQ_QUEUE in row.text
            return bool(row.find_elements(By.LINK_TEXT, running))

        wait_until(shows_running_job, "the worker's job in flight on /workers", within=WAIT, interval=0.5)
        screenshot(browser, "workers", tmp_path)
    finally:
        assert stack.cli("cancel", running).returncode == 0
    wait_until(lambda: stack.state(running) == "CANCELLED", "the long job to stop", within=WAIT)


def test_read_only_mode_hides_the_buttons_and_refuses_posts(stack: Stack, browser: WebDriver) -> None:
    viewer = Dashboard({**stack.env, "CONVEYOR_DASHBOARD_READ_ONLY": "1"})
    try:
        stack.enqueue("demo.fail", {"permanent": True}, queue=DLQ_QUEUE)
        wait_until(lambda: stack.json("dlq", "list", DLQ_QUEUE).get("deadLetters"), "a dead letter", within=WAIT)
        for path in (f"/queues/{QUEUE}", f"/queues/{DLQ_QUEUE}/dead-letters"):
            browser.get(viewer.url + path)
            wait(browser).until(ec.presence_of_element_located((By.ID, "read-only")))
            assert browser.find_elements(By.CSS_SELECTOR, "button[data-post]") == []
        status, answer = viewer.post(f"/queues/{QUEUE}/pause", {})
        assert status == 403 and answer["code"] == "PERMISSION_DENIED"
        status, _ = viewer.post(f"/queues/{DLQ_QUEUE}/dead-letters/purge", {"all": True})
        assert status == 403
        assert stack.json("stats", QUEUE)["stats"].get("paused", False) is False  # type: ignore[attr-defined]
        assert stack.json("dlq", "list", DLQ_QUEUE).get("deadLetters")
    finally:
        viewer.stop()


def test_actions_refuse_bad_input_and_map_grpc_errors(stack: Stack) -> None:
    status, answer = stack.dashboard.post(f"/queues/{DLQ_QUEUE}/dead-letters/retry", {"job_id": "x", "all": True})
    assert status == 400 and answer["code"] == "INVALID_ARGUMENT"
    request = urllib.request.Request(stack.dashboard.url + f"/queues/{QUEUE}/pause", data=b"queue=x")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    refused.value.close()
    assert refused.value.code == 415  # a plain form post (what another site could send) changes nothing
    assert stack.json("stats", QUEUE)["stats"].get("paused", False) is False  # type: ignore[attr-defined]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(stack.dashboard.url + f"/jobs/{QUEUE}/01JZZZZZZZZZZZZZZZZZZZZZZZ", timeout=10)
    missing.value.close()
    assert missing.value.code == 404


def test_a_service_that_cannot_be_reached_is_a_503_naming_unavailable(stack: Stack, browser: WebDriver) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    orphan = Dashboard({**stack.env, "CONVEYOR_PRODUCER_ADDR": nowhere, "CONVEYOR_RESULTS_ADDR": nowhere})
    try:
        for path in ("/", f"/queues/{QUEUE}", "/jobs", "/workers"):
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(orphan.url + path, timeout=30)
            with failed.value:
                assert failed.value.code == 503, path
                assert "UNAVAILABLE" in failed.value.read().decode()
        status, answer = orphan.post(f"/queues/{QUEUE}/pause", {})
        assert status == 503 and answer["code"] == "UNAVAILABLE"
        browser.get(orphan.url + "/")
        assert "UNAVAILABLE" in text_of(browser, "#error-message")
    finally:
        orphan.stop()


def test_the_watch_relay_streams_a_jobs_events_as_server_sent_events(stack: Stack) -> None:
    job_id = stack.enqueue("demo.sleep", {"seconds": 0.2, "steps": 2})
    assert stack.cli("watch", job_id).returncode == 0
    url = f"{stack.dashboard.url}/api/watch/{job_id}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        messages = response.read().decode().strip().split("\n\n")
    events = [json.loads(m.split("data: ", 1)[1]) for m in messages if m.startswith("id: ")]
    assert [e["type"] for e in events] == ["QUEUED", "ACTIVE", "PROGRESS", "PROGRESS", "SUCCEEDED"]
    assert events[-1]["final"] is True and json.loads(events[-1]["result"]) == {"slept": 0.2, "steps": 2}
    assert messages[-1] == "event: end\ndata: {}"

    # A reconnecting EventSource sends Last-Event-ID: the relay resumes after it, with no repeat.
    request = urllib.request.Request(url, headers={"Last-Event-ID": events[2]["id"]})
    with urllib.request.urlopen(request, timeout=30) as response:
        resumed = [m for m in response.read().decode().strip().split("\n\n") if m.startswith("id: ")]
    assert [json.loads(m.split("data: ", 1)[1])["type"] for m in resumed] == ["PROGRESS", "SUCCEEDED"]

    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{stack.dashboard.url}/api/watch/{QUEUE}/01JZZZZZZZZZZZZZZZZZZZZZZZ", timeout=30)
    with missing.value:
        assert missing.value.code == 404


def test_a_jobs_page_without_the_results_service_still_shows_the_job(stack: Stack, browser: WebDriver) -> None:
    job_id = stack.enqueue("demo.echo", {"k": "v"})
    assert stack.cli("watch", job_id).returncode == 0
    blind = Dashboard({**stack.env, "CONVEYOR_RESULTS_ADDR": f"127.0.0.1:{free_port()}"})
    try:
        browser.get(f"{blind.url}/jobs/{job_id}")
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "job-state"), "SUCCEEDED"))
        assert "UNAVAILABLE" in text_of(browser, "#history-unavailable")
        # The relay replays what the results service could not give.
        wait(browser).until(
            lambda d: (
                [r.get_attribute("data-type") for r in d.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")]
                == ["QUEUED", "ACTIVE", "SUCCEEDED"]
            )
        )
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"{blind.url}/jobs?queue={QUEUE}", timeout=30)
        with failed.value:
            assert failed.value.code == 503
    finally:
        blind.stop()
