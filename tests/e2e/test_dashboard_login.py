"""The dashboard with sign-in (CONVEYOR_DASHBOARD_LOGIN=1), in headless Chromium, against a stack checking tokens.

Results, producer and a worker run as processes with a token file (as in test_auth.py); the
dashboard runs with the sign-in on and no token of its own. Each person signs in with their own
token: a reader sees no action button and a POST of theirs is refused; an admin pauses a queue
and a schedule; a token revoked from the file signs its holder out on the next page; a bad token
is told so on the sign-in page.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select

from conveyor.common import auth
from conveyor.common.auth import Role
from conveyor.common.devstack.servers import PostgresServer, RedisServer
from tests.e2e.test_dashboard import CONVEYOR, Dashboard, browser, screenshot, text_of, wait
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian's chromium and chromium-driver (deploy/local/install-system-deps.sh)",
    ),
]
__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with test_dashboard.py

QUEUE = "signed"
SECRET = "a-dashboard-secret-of-at-least-32-characters"


@dataclass
class Stack:
    env: dict[str, str]
    dashboard: Dashboard
    tokens: dict[str, str]
    token_file: Path

    def cli(self, *args: str, token: str = "admin") -> subprocess.CompletedProcess[str]:
        env = {**self.env, "CONVEYOR_TOKEN": self.tokens[token]}
        return subprocess.run([CONVEYOR, *args], env=env, capture_output=True, text=True, timeout=60)

    def paused(self) -> bool:
        done = self.cli("stats", QUEUE, "--json")
        assert done.returncode == 0, done.stderr
        return bool(json.loads(done.stdout)["stats"].get("paused", False))

    def schedule_paused(self, schedule_id: str) -> bool:
        done = self.cli("schedules", "get", schedule_id, "--json")
        assert done.returncode == 0, done.stderr
        return bool(json.loads(done.stdout).get("paused", False))

    def entries(self, *names: str) -> str:
        roles = {"admin": ("ops", Role.ADMIN), "reader": ("viewer", Role.READER), "temp": ("contractor", Role.ADMIN)}
        text = "".join(auth.entry_for(self.tokens[n], roles[n][0], roles[n][1]) for n in names)
        return text + auth.entry_for(self.tokens["service"], "producer-service", Role.READER)


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tokens = {name: auth.new_token() for name in ("admin", "reader", "temp", "service")}
    token_file = tmp_path_factory.mktemp("dashauth") / "tokens.toml"
    database = f"dashauth_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    database_url = pg_server.url.rsplit("/", 1)[0] + f"/{database}"
    with RedisServer() as redis_server:
        common = {"REDIS_URL": redis_server.url, "CONVEYOR_AUTH_TOKENS_FILE": str(token_file)}
        processes: list[ServiceProcess] = []
        dashboard: Dashboard | None = None
        try:
            stack = Stack({}, None, tokens, token_file)  # type: ignore[arg-type]
            token_file.write_text(stack.entries("admin", "reader", "temp"))
            results = ServiceProcess("results", {**common, "DATABASE_URL": database_url}).start()
            processes.append(results)
            producer_env = {**common, "CONVEYOR_RESULTS_ADDR": results.addr, "CONVEYOR_TOKEN": tokens["service"]}
            producer = ServiceProcess("producer", producer_env).start()
            processes.append(producer)
            processes.append(ServiceProcess("worker", {**common, "CONVEYOR_QUEUES": QUEUE}).start())
            env = {
                **os.environ,
                "CONVEYOR_PRODUCER_ADDR": producer.addr,
                "CONVEYOR_RESULTS_ADDR": results.addr,
                "NO_COLOR": "1",
                "COLUMNS": "200",
            }
            env.pop("CONVEYOR_TOKEN", None)
            dashboard = Dashboard({**env, "CONVEYOR_DASHBOARD_LOGIN": "1", "CONVEYOR_DASHBOARD_SECRET": SECRET})
            stack.env, stack.dashboard = env, dashboard
            done = stack.cli("enqueue", "demo.echo", "--queue", QUEUE, "--payload", "{}")
            assert done.returncode == 0, done.stderr
            yield stack
        finally:
            if dashboard is not None:
                dashboard.stop()
            for p in reversed(processes):
                p.kill()


def sign_in(browser: WebDriver, stack: Stack, token: str, path: str = "/") -> None:
    browser.delete_all_cookies()
    browser.get(stack.dashboard.url + path)
    wait(browser).until(ec.presence_of_element_located((By.ID, "login-form")))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()


def post_from_page(browser: WebDriver, path: str) -> tuple[int, str]:
    """A POST from the signed-in page's own script, with its CSRF token: what a crafted button would send."""
    answer = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", headers: postHeaders(), body: "{}"})
          .then(async (r) => done([r.status, await r.text()]));
        """,
        path,
    )
    return int(answer[0]), str(answer[1])


def test_a_bad_token_is_told_so_on_the_sign_in_page(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    browser.delete_all_cookies()
    browser.get(stack.dashboard.url + "/workers")
    wait(browser).until(ec.presence_of_element_located((By.ID, "login-form")))
    assert "/login?next=%2Fworkers" in browser.current_url
    screenshot(browser, "login", tmp_path)
    sign_in(browser, stack, auth.new_token())
    error = wait(browser).until(ec.visibility_of_element_located((By.ID, "login-error")))
    assert error.text == "Sign-in refused: unknown or revoked token."
    assert not browser.get_cookie("conveyor_session")
    # Another page still sends back here.
    browser.get(stack.dashboard.url + "/")
    wait(browser).until(ec.presence_of_element_located((By.ID, "login-form")))


def test_a_reader_sees_no_action_buttons_and_a_post_is_refused(stack: Stack, browser: WebDriver) -> None:
    sign_in(browser, stack, stack.tokens["reader"], f"/queues/{QUEUE}")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "whoami"), "viewer · reader"))
    assert browser.current_url.endswith(f"/queues/{QUEUE}")  # back where the sign-in was asked
    assert browser.find_elements(By.ID, "read-only")
    assert text_of(browser, "#queue-status") == "running"
    assert not browser.find_elements(By.CSS_SELECTOR, "button.action")
    assert not browser.find_elements(By.ID, "pause")
    cookie = browser.get_cookie("conveyor_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert stack.tokens["reader"] not in str(browser.execute_script("return document.cookie"))
    for path in ("/schedules", "/jobs", "/"):
        browser.get(stack.dashboard.url + path)
        wait(browser).until(ec.presence_of_element_located((By.ID, "whoami")))
        assert not browser.find_elements(By.CSS_SELECTOR, "button.action"), path
    status, body = post_from_page(browser, f"/queues/{QUEUE}/pause")
    assert status == 403
    assert "only an admin may change anything" in body
    assert not stack.paused()


def test_an_admin_pauses_a_queue_and_a_schedule_then_signs_out(
    stack: Stack, browser: WebDriver, tmp_path: Path
) -> None:
    created = stack.cli("schedules", "create", "signed-nightly", "demo.echo", "--queue", QUEUE, "--cron", "0 3 * * *")
    assert created.returncode == 0, created.stderr
    sign_in(browser, stack, stack.tokens["admin"], f"/queues/{QUEUE}")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "whoami"), "ops · admin"))
    assert not browser.find_elements(By.ID, "read-only")
    try:
        wait(browser).until(ec.element_to_be_clickable((By.ID, "pause"))).click()
        wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
        browser.find_element(By.ID, "confirm-ok").click()
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "queue-status"), "paused"))
        assert stack.paused()
        # The CSRF token is required: the same POST without it is refused.
        refused = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            fetch(arguments[0], {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})
              .then(async (r) => done([r.status, await r.text()]));
            """,
            f"/queues/{QUEUE}/resume",
        )
        assert refused[0] == 403 and "CSRF" in refused[1]
        assert stack.paused()
    finally:
        assert stack.cli("resume", QUEUE).returncode == 0

    # A per-key limit, set and cleared from the queue page.
    browser.get(f"{stack.dashboard.url}/queues/{QUEUE}")
    wait(browser).until(ec.presence_of_element_located((By.ID, "no-key-limits")))
    Select(browser.find_element(By.ID, "key-rate-scope")).select_by_value("key")
    browser.find_element(By.ID, "key-rate-key").send_keys("acme")
    browser.find_element(By.ID, "key-rate-limit").send_keys("5")
    browser.find_element(By.ID, "key-rate-period").send_keys("60")
    browser.find_element(By.ID, "set-key-rate").click()
    wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    row = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, '#key-limits tr[data-key="acme"]')))
    assert "5 per 1 min" in row.text
    shown = stack.cli("limits", "show", QUEUE, "--json")
    assert json.loads(shown.stdout)["keys"][0]["key"] == "acme", shown.stdout
    screenshot(browser, "queue-key-limits", tmp_path)
    row.find_element(By.CSS_SELECTOR, "button.clear-key-rate").click()
    wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser).until(ec.presence_of_element_located((By.ID, "no-key-limits")))

    browser.get(stack.dashboard.url + "/schedules")
    row = wait(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-schedule-id="signed-nightly"]'))
    )
    assert row.find_element(By.CSS_SELECTOR, ".schedule-state").text == "active"
    row.find_element(By.CSS_SELECTOR, "button.pause-schedule").click()
    wait(browser).until(ec.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-ok").click()
    wait(browser).until(
        ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, 'tr[data-schedule-id="signed-nightly"] .schedule-state'), "paused"
        )
    )
    assert stack.schedule_paused("signed-nightly")
    screenshot(browser, "schedules-paused", tmp_path)
    browser.find_element(By.CSS_SELECTOR, 'tr[data-schedule-id="signed-nightly"] button.resume-schedule').click()
    wait(browser).until(
        ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, 'tr[data-schedule-id="signed-nightly"] .schedule-state'), "active"
        )
    )
    assert not stack.schedule_paused("signed-nightly")

    browser.find_element(By.ID, "logout").click()
    wait(browser).until(ec.presence_of_element_located((By.ID, "login-form")))
    assert not browser.get_cookie("conveyor_session")
    browser.get(stack.dashboard.url + "/")
    wait(browser).until(ec.presence_of_element_located((By.ID, "login-form")))


def test_a_token_revoked_from_the_file_signs_its_holder_out(stack: Stack, browser: WebDriver) -> None:
    sign_in(browser, stack, stack.tokens["temp"], "/workers")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "whoami"), "contractor · admin"))
    try:
        stack.token_file.write_text(stack.entries("admin", "reader"))  # the services re-read it within a second

        def signed_out() -> bool:
            browser.get(stack.dashboard.url + "/workers")
            return bool(browser.find_elements(By.ID, "login-form"))

        wait_until(signed_out, "the revoked token's holder sent to the sign-in page", within=30, interval=0.3)
        assert browser.find_element(By.ID, "login-expired").is_displayed()
        assert not browser.get_cookie("conveyor_session")
        sign_in(browser, stack, stack.tokens["temp"])
        assert wait(browser).until(ec.visibility_of_element_located((By.ID, "login-error"))).text == (
            "Sign-in refused: unknown or revoked token."
        )
    finally:
        stack.token_file.write_text(stack.entries("admin", "reader", "temp"))
