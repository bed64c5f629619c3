"""Bulk retry / cancel / delete on the dashboard's jobs page, in headless Chromium against a real stack.

The stack and the browser are test_dashboard.py's fixtures (a stack of its own for this module:
fresh Redis, database and queues). Each action is asked for in the page's confirm dialog, which
names how many jobs; the outcome is checked through the CLI (the gRPC APIs), not the page alone.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec

from conveyor.common.client import ConveyorClient
from conveyor.dashboard import bulk, filters, views
from conveyor.v1 import results_service_pb2
from tests.e2e import test_dashboard as dashboard_tests
from tests.e2e.test_dashboard import DLQ_QUEUE, QUEUE, WAIT, Dashboard, Stack, screenshot, text_of, wait
from tests.support.wait import wait_until

# test_dashboard.py's fixtures and marks (module-scoped: this module gets a stack of its own).
pytestmark = dashboard_tests.pytestmark
stack = dashboard_tests.stack
browser = dashboard_tests.browser


def listed(stack: Stack, queue: str, *filters: str) -> set[str]:
    """The ids ResultsService lists for ``queue`` (and the CLI's filters)."""
    jobs: Any = stack.json("jobs", "--queue", queue, "--limit", "200", *filters).get("jobs", [])
    return {str(j["id"]) for j in jobs}


def confirm(browser: WebDriver, expected: str, ok: bool = True) -> None:
    # Found again on every poll: the page redraws while the dialog opens, and a node read once can be
    # detached by then (Chrome: "Node with given id does not belong to the document").
    def asking(driver: WebDriver) -> bool:
        try:
            dialog = driver.find_element(By.ID, "confirm")
            return dialog.is_displayed() and expected in dialog.text
        except WebDriverException:
            return False

    def answered(driver: WebDriver) -> bool:
        try:
            driver.find_element(By.ID, "confirm-ok" if ok else "confirm-cancel").click()
        except WebDriverException:
            return False  # detached before the click landed: nothing was clicked, find it again
        return True

    wait(browser).until(asking, f"the confirmation asking {expected!r}")
    wait(browser).until(answered, "the confirmation's button to take the click")
    wait(browser).until(ec.invisibility_of_element_located((By.ID, "confirm")))


def rows(browser: WebDriver) -> set[str]:
    return {str(r.get_attribute("data-job-id")) for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")}


def test_bulk_retry_of_selected_dead_letters_asks_first(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    poison = {"message": "poison", "permanent": True}
    dead = [stack.enqueue("demo.fail", poison, queue=DLQ_QUEUE) for _ in range(3)]
    for job_id in dead:
        assert stack.cli("watch", job_id).returncode == 3
    wait_until(lambda: listed(stack, DLQ_QUEUE, "--state", "failed") >= set(dead), "the failures in history", WAIT)
    # Paused, the retried jobs stay QUEUED where the test can see them.
    assert stack.cli("pause", DLQ_QUEUE).returncode == 0
    try:
        browser.get(f"{stack.dashboard.url}/jobs?queue={DLQ_QUEUE}&state=FAILED")
        wait(browser).until(ec.presence_of_element_located((By.ID, "jobs")))
        assert rows(browser) == set(dead)
        browser.find_element(By.ID, "retry-selected").click()  # nothing selected: nothing asked, nothing done
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "Select jobs first"))

        browser.find_element(By.ID, "select-page").click()
        assert text_of(browser, "#selected-count") == "3"
        screenshot(browser, "jobs-bulk", tmp_path)
        browser.find_element(By.ID, "retry-selected").click()
        confirm(browser, "Retry the 3 selected jobs?", ok=False)
        assert len(stack.json("dlq", "list", DLQ_QUEUE)["deadLetters"]) == 3  # type: ignore[arg-type]

        assert text_of(browser, "#selected-count") == "3"  # still selected after saying no
        browser.find_element(By.ID, "retry-selected").click()
        confirm(browser, "Retry the 3 selected jobs?")
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "Retry: 3 of 3 done, 0 refused"))
        assert '"succeeded": 3' in text_of(browser, "#bulk-result")
        assert stack.json("dlq", "list", DLQ_QUEUE) == {}
        assert {stack.state(j) for j in dead} == {"QUEUED"}
    finally:
        assert stack.cli("resume", DLQ_QUEUE).returncode == 0
    for job_id in dead:
        assert stack.cli("watch", job_id).returncode == 3  # failed again: the retry ran them


def test_bulk_cancel_then_delete_everything_a_filter_matches(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    done = stack.enqueue("demo.echo", {"bulk": "done"})
    assert stack.cli("watch", done).returncode == 0
    assert stack.cli("pause", QUEUE).returncode == 0
    try:
        waiting = [stack.enqueue("demo.echo", {"bulk": i}) for i in range(4)]
        everything = {done, *waiting}
        wait_until(lambda: listed(stack, QUEUE) >= everything, "the jobs in history", WAIT)
        assert listed(stack, QUEUE) == everything

        browser.get(f"{stack.dashboard.url}/jobs?queue={QUEUE}")
        wait(browser).until(ec.presence_of_element_located((By.ID, "jobs")))
        browser.find_element(By.ID, "cancel-matching").click()
        confirm(browser, "Cancel all 5 matching jobs?")
        wait(browser).until(
            ec.text_to_be_present_in_element(
                (By.ID, "flash"), "Cancel: 4 of 5 done, 1 refused (1 \u00d7 FAILED_PRECONDITION: already finished)"
            )
        )
        assert {stack.state(j) for j in waiting} == {"CANCELLED"}
        assert stack.state(done) == "SUCCEEDED"

        # One more, still waiting: delete takes the finished ones and refuses it.
        late = stack.enqueue("demo.echo", {"bulk": "late"})
        wait_until(lambda: listed(stack, QUEUE, "--state", "cancelled") >= set(waiting), "the cancels in history", WAIT)
        wait_until(lambda: late in listed(stack, QUEUE), "the late job in history", WAIT)
        browser.get(f"{stack.dashboard.url}/jobs?queue={QUEUE}")
        wait(browser).until(lambda d: rows(d) == everything | {late})
        browser.find_element(By.ID, "delete-matching").click()
        confirm(browser, "Delete all 6 matching jobs?")
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "Delete: 5 of 6 done, 1 refused"))
        assert "not finished (QUEUED)" in text_of(browser, "#flash")
        assert rows(browser) == {late}
        assert listed(stack, QUEUE) == {late}
        screenshot(browser, "jobs-bulk-result", tmp_path)
    finally:
        assert stack.cli("resume", QUEUE).returncode == 0
    assert stack.cli("watch", late).returncode == 0


def test_bulk_delete_of_selected_jobs(stack: Stack, browser: WebDriver) -> None:
    first, second = (stack.enqueue("demo.echo", {"pick": i}) for i in range(2))
    for job_id in (first, second):
        assert stack.cli("watch", job_id).returncode == 0
    wait_until(lambda: {first, second} <= listed(stack, QUEUE), "the jobs in history", WAIT)
    browser.get(f"{stack.dashboard.url}/jobs?queue={QUEUE}")
    wait(browser).until(ec.presence_of_element_located((By.ID, "jobs")))
    browser.find_element(By.CSS_SELECTOR, f'input.select-job[value="{first}"]').click()
    assert text_of(browser, "#selected-count") == "1"
    browser.find_element(By.ID, "delete-selected").click()
    confirm(browser, "Delete the 1 selected job?")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "Delete: 1 of 1 done, 0 refused"))
    assert first not in rows(browser) and second in rows(browser)
    assert first not in listed(stack, QUEUE)


def test_bulk_actions_refuse_bad_input_and_read_only(stack: Stack, browser: WebDriver) -> None:
    post = stack.dashboard.post
    job_id = stack.enqueue("demo.echo", {"k": 1})
    assert stack.cli("watch", job_id).returncode == 0
    status, answer = post("/jobs/bulk/cancel", {"job_ids": [job_id], "filter": []})
    assert status == 400 and "not both" in str(answer["error"])
    status, answer = post("/jobs/bulk/explode", {"job_ids": [job_id]})
    assert status == 400 and "retry, cancel, delete" in str(answer["error"])
    status, answer = post("/jobs/bulk/delete", {"job_ids": [job_id, "nope"]})
    assert status == 400 and "'nope'" in str(answer["error"])
    status, answer = post("/jobs/bulk/delete", {"filter": [["state", "NOPE"]]})
    assert status == 400 and answer["code"] == "INVALID_ARGUMENT" and "state" in str(answer["error"])
    status, answer = post("/jobs/bulk/delete", {"filter": {"state": "SUCCEEDED"}})
    assert status == 400 and "[parameter, value] pairs" in str(answer["error"])
    status, answer = post("/jobs/bulk/delete", {"filter": [["where", "x~1"]]})
    assert status == 400 and answer["code"] == "INVALID_ARGUMENT" and "where" in str(answer["error"])
    status, answer = post("/jobs/bulk/delete", {"job_ids": []})
    assert status == 400
    assert stack.state(job_id) == "SUCCEEDED" and job_id in listed(stack, QUEUE)  # bad input changed nothing

    viewer = Dashboard({**stack.env, "CONVEYOR_DASHBOARD_READ_ONLY": "1"})
    try:
        browser.get(f"{viewer.url}/jobs?queue={QUEUE}")
        wait(browser).until(ec.presence_of_element_located((By.ID, "jobs")))
        assert browser.find_elements(By.ID, "bulk") == []
        assert browser.find_elements(By.CSS_SELECTOR, "input.select-job") == []
        status, answer = viewer.post("/jobs/bulk/delete", {"job_ids": [job_id]})
        assert status == 403 and answer["code"] == "PERMISSION_DENIED"
        assert job_id in listed(stack, QUEUE)
    finally:
        viewer.stop()


async def test_everything_a_filter_matches_is_paged_and_capped(stack: Stack) -> None:
    ids = [stack.enqueue("demo.echo", {"cap": i}, queue=DLQ_QUEUE) for i in range(5)]
    for job_id in ids:
        assert stack.cli("watch", job_id).returncode == 0
    wait_until(lambda: set(ids) <= listed(stack, DLQ_QUEUE, "--type", "demo.echo"), "the jobs in history", WAIT)
    matching = results_service_pb2.ListJobsRequest(queue=DLQ_QUEUE, type="demo.echo")
    async with ConveyorClient(stack.env["CONVEYOR_PRODUCER_ADDR"], stack.env["CONVEYOR_RESULTS_ADDR"]) as client:
        found, more = await bulk.matching_ids(client, matching, cap=3)
        assert (found, more) == (list(reversed(ids))[:3], True)  # newest first, then capped
        found, more = await bulk.matching_ids(client, matching, cap=5)
        assert (sorted(found), more) == (sorted(ids), False)
        found, more = await bulk.matching_ids(client, matching)
        assert (sorted(found), more) == (sorted(ids), False)
        # The page's payload conditions narrow "everything the filter matches" too.
        by_payload = filters.list_jobs_request([("queue", DLQ_QUEUE), ("where", "cap>=3")])
        found, more = await bulk.matching_ids(client, by_payload)
        assert (sorted(found), more) == (sorted(ids[3:]), False)


def test_edit_a_schedule_timing_and_payload(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    created = stack.cli(
        "schedules",
        "create",
        "dash-edit",
        "demo.echo",
        "--queue",
        QUEUE,
        "--cron",
        "0 3 * * *",
        "--payload",
        '{"v": 1}',
    )
    assert created.returncode == 0, created.stderr
    try:
        browser.get(stack.dashboard.url + "/schedules")
        row = wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-schedule-id="dash-edit"]')))
        row.find_element(By.CSS_SELECTOR, "a.edit").click()
        wait(browser).until(ec.presence_of_element_located((By.ID, "schedule-form")))
        assert text_of(browser, "#schedule-when") == "cron 0 3 * * *"
        assert text_of(browser, "#schedule-next").startswith("20") and text_of(browser, "#schedule-last") == "\u2013"
        assert '"v": 1' in str(browser.find_element(By.ID, "edit-payload").get_attribute("value"))

        # Both a cron and an interval: refused, nothing changed.
        browser.find_element(By.ID, "edit-interval").send_keys("90")
        browser.find_element(By.ID, "save-schedule").click()
        confirm(browser, "Change schedule dash-edit?")
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "INVALID_ARGUMENT"))
        assert "not both" in text_of(browser, "#flash")
        assert stack.json("schedules", "get", "dash-edit")["spec"]["cron"] == "0 3 * * *"  # type: ignore[index]

        browser.find_element(By.ID, "edit-cron").clear()
        payload = browser.find_element(By.ID, "edit-payload")
        payload.clear()
        payload.send_keys('{"v": 2, "who": "dashboard"}')
        screenshot(browser, "schedule-edit", tmp_path)
        browser.find_element(By.ID, "save-schedule").click()
        confirm(browser, "Change schedule dash-edit?")
        wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "Save: done"))
        row = browser.find_element(By.CSS_SELECTOR, 'tr[data-schedule-id="dash-edit"]')
        assert "every 90s" in row.text
        spec: Any = stack.json("schedules", "get", "dash-edit")["spec"]
        assert spec.get("cron", "") == "" and spec["interval"] == "90s"
        job_id = str(stack.json("schedules", "run-now", "dash-edit")["jobId"])
        assert stack.cli("watch", job_id).returncode == 0
        with urllib.request.urlopen(f"{stack.dashboard.url}/api/payload/{job_id}", timeout=10) as response:
            assert json.loads(response.read()) == {"payload": {"v": 2, "who": "dashboard"}}
    finally:
        stack.cli("schedules", "delete", "dash-edit")


def summary_is(expected: str) -> Callable[[WebDriver], bool]:
    def check(d: WebDriver) -> bool:
        text = d.execute_script("const e = document.getElementById('limits-summary'); return e && e.textContent;")
        return bool(text == expected)

    return check


def test_set_and_clear_queue_limits_from_its_page(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(f"{stack.dashboard.url}/queues/{QUEUE}")
    wait(browser).until(ec.presence_of_element_located((By.ID, "rate-form")))
    assert text_of(browser, "#limits-summary") == "none"

    browser.find_element(By.ID, "concurrency-limit").send_keys("0")
    browser.find_element(By.ID, "set-concurrency").click()
    confirm(browser, f"Set the concurrency cap of queue {QUEUE}?")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "flash"), "INVALID_ARGUMENT"))
    assert "limit" in text_of(browser, "#flash")

    field = browser.find_element(By.ID, "concurrency-limit")
    field.clear()
    field.send_keys("3")
    browser.find_element(By.ID, "set-concurrency").click()
    confirm(browser, f"Set the concurrency cap of queue {QUEUE}?")
    wait(browser).until(ec.text_to_be_present_in_element((By.ID, "limits-summary"), "at most 3 running"))

    browser.find_element(By.ID, "rate-limit").send_keys("20")
    browser.find_element(By.ID, "rate-period").send_keys("60")
    browser.find_element(By.ID, "set-rate").click()
    confirm(browser, f"Set the rate limit of queue {QUEUE}?")
    wait(browser).until(
        ec.text_to_be_present_in_element((By.ID, "limits-summary"), "rate 20 per 1 min, at most 3 running")
    )
    limits = stack.json("limits", "show", QUEUE)
    assert "20" in json.dumps(limits) and "3" in json.dumps(limits)
    screenshot(browser, "queue-limits", tmp_path)

    for kind, left in (("rate", "at most 3 running"), ("concurrency", "none")):
        browser.find_element(By.ID, f"clear-{kind}").click()
        confirm(browser, f"Clear the {'rate limit' if kind == 'rate' else 'concurrency cap'} of queue {QUEUE}?")
        wait(browser).until(summary_is(left))


async def api_series(stack: Stack, window: str) -> tuple[int, float]:
    """(finished jobs, highest run-time p95) of GetJobSeries over ``window``, every queue."""
    async with ConveyorClient(stack.env["CONVEYOR_PRODUCER_ADDR"], stack.env["CONVEYOR_RESULTS_ADDR"]) as client:
        reply = await client.get_job_series(views.SERIES_WINDOWS[window])
    finished = sum(b.succeeded + b.failed + b.dead_lettered + b.cancelled for b in reply.buckets)
    return finished, max(b.run.p95 for b in reply.buckets)


async def test_overview_charts_switch_between_hour_day_and_week(
    stack: Stack, browser: WebDriver, tmp_path: Path
) -> None:
    ran = [stack.enqueue("demo.sleep", {"seconds": 0.3}) for _ in range(3)]
    for job_id in ran:
        assert stack.cli("watch", job_id).returncode == 0
    wait_until(lambda: set(ran) <= listed(stack, QUEUE, "--state", "succeeded"), "the jobs in history", WAIT)

    async def drawn(window: str, buckets: int) -> None:
        def ready(d: WebDriver) -> bool:
            # One script reads both, so a page being replaced cannot go stale between two reads.
            return bool(
                d.execute_script(
                    "const l = document.getElementById('latency-chart');"
                    "const t = document.getElementById('throughput-chart');"
                    "return !!(l && t && l.dataset.window === arguments[0] && t.dataset.drawn === 'true');",
                    window,
                )
            )

        wait(browser).until(ready)
        labels, finished, run_p95 = browser.execute_script(
            "const t = Chart.getChart(document.getElementById('throughput-chart'));"
            "const l = Chart.getChart(document.getElementById('latency-chart'));"
            "const sum = (ds) => ds.reduce((a, d) => a + d.data.reduce((x, y) => x + y, 0), 0);"
            "return [t.data.labels.length, sum(t.data.datasets), Math.max(...l.data.datasets[3].data)];"
        )
        assert labels == buckets
        # What the charts draw is what the results service counts (no job finishes meanwhile).
        expected_finished, expected_p95 = await api_series(stack, window)
        assert finished == expected_finished >= len(ran)
        assert run_p95 == pytest.approx(expected_p95, abs=0.001) and run_p95 > 0

    browser.get(stack.dashboard.url + "/")
    await drawn("hour", 60)
    assert "current" in str(browser.find_element(By.ID, "window-hour").get_attribute("class"))
    screenshot(browser, "overview-charts", tmp_path)
    browser.find_element(By.ID, "window-day").click()
    wait(browser).until(lambda d: "window=day" in d.current_url)
    await drawn("day", 96)
    assert "last day" in text_of(browser, "#charts h2")
    browser.find_element(By.ID, "window-week").click()
    await drawn("week", 84)
    browser.get(stack.dashboard.url + "/?window=year")
    assert "INVALID_ARGUMENT" in text_of(browser, "#error-message") and "window" in text_of(browser, "#error-message")
