"""Bulk retry / cancel / delete of jobs chosen by id or matched by the jobs page's filter.

Everything goes through the gRPC APIs: the ids of "everything the filter matches" come from
ResultsService.ListJobs, paged with its keyset token, at most ``MAX_JOBS`` per action (``more``
says that matching jobs were left); cancel is ProducerService.CancelJob per job, retry is
AdminService.RetryDeadLetters per job (a job that is no dead letter is refused by it), delete is
ResultsService.DeleteJobs in chunks of 1,000. Each job's outcome is counted: done, or refused
with the reason, so a person sees how many changed and why the others did not.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from conveyor.common.client import ConveyorClient
from conveyor.common.errors import ConveyorError, InvalidArgument
from conveyor.common.ids import parse_job_id
from conveyor.v1 import results_service_pb2

ACTIONS = ("retry", "cancel", "delete")
#: Most jobs one action changes; more matching jobs are reported as ``more``.
MAX_JOBS = 10_000
#: ListJobs' largest page, and DeleteJobs' largest call.
PAGE = 1000
#: Per-job RPCs in flight at once (cancel, retry).
PARALLEL = 16
#: Refused jobs listed by id in the answer (all are counted).
EXAMPLES = 20


@dataclass
class Outcome:
    """What one bulk action did."""

    action: str
    matched: int = 0
    done: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    more: bool = False

    def answer(self) -> dict[str, Any]:
        reasons = Counter(reason for _, reason in self.refused)
        return {
            "action": self.action,
            "matched": self.matched,
            "succeeded": len(self.done),
            "refused": len(self.refused),
            "reasons": dict(reasons.most_common()),
            "examples": [{"job_id": j, "reason": r} for j, r in self.refused[:EXAMPLES]],
            "more": self.more,
        }


async def matching_ids(
    client: ConveyorClient, matching: results_service_pb2.ListJobsRequest, cap: int = MAX_JOBS
) -> tuple[list[str], bool]:
    """The ids of up to ``cap`` jobs ListJobs returns for ``matching`` (newest first), and whether more match."""
    ids: list[str] = []
    token = ""
    while True:
        request = results_service_pb2.ListJobsRequest()
        request.CopyFrom(matching)
        request.page_size = min(PAGE, cap - len(ids) + 1)
        request.page_token = token
        page = await client.list_jobs(request)
        ids.extend(job.id for job in page.jobs)
        if len(ids) > cap:
            return ids[:cap], True
        if not page.next_page_token:
            return ids, False
        if len(ids) == cap:
            return ids, True
        token = page.next_page_token


def chosen_ids(raw: object) -> list[str]:
    """The ``job_ids`` of an action's body: 1-``MAX_JOBS`` well-formed job ids, duplicates dropped."""
    if not isinstance(raw, list) or not raw or not all(isinstance(i, str) for i in raw):
        raise InvalidArgument({"job_ids": "give a non-empty list of job ids, or filter: {...} for every match"})
    if len(raw) > MAX_JOBS:
        raise InvalidArgument({"job_ids": f"at most {MAX_JOBS} per action"})
    bad = [i for i in raw if parse_job_id(i) is None]
    if bad:
        raise InvalidArgument({"job_ids": f"must be job ids '<queue>/<ULID>'; not one: {bad[0]!r} (nothing changed)"})
    return list(dict.fromkeys(raw))


# Why a job was refused, by action and gRPC code: one line a person can act on, the same for every
# job it applies to (so they are counted together). Other codes keep the server's message.
EXPLAIN = {
    ("cancel", "FAILED_PRECONDITION"): "FAILED_PRECONDITION: already finished",
    ("retry", "FAILED_PRECONDITION"): "FAILED_PRECONDITION: not a dead letter (only FAILED or DEAD_LETTERED jobs are)",
    ("cancel", "NOT_FOUND"): "NOT_FOUND: no such job (its record may have expired)",
    ("retry", "NOT_FOUND"): "NOT_FOUND: no such dead letter (purged, or its record expired)",
}


def _reason(action: str, exc: ConveyorError) -> str:
    return EXPLAIN.get((action, exc.code.name)) or f"{exc.code.name}: {exc.message}"


async def _each(ids: list[str], call: Callable[[str], Awaitable[None]], outcome: Outcome) -> None:
    """``call`` for every id, ``PARALLEL`` at once; a ConveyorError refuses that job only."""
    gate = asyncio.Semaphore(PARALLEL)
    results: dict[str, str | None] = {}

    async def one(job_id: str) -> None:
        async with gate:
            try:
                await call(job_id)
                results[job_id] = None
            except ConveyorError as exc:
                results[job_id] = _reason(outcome.action, exc)

    await asyncio.gather(*(one(i) for i in ids))
    for job_id in ids:
        reason = results[job_id]
        if reason is None:
            outcome.done.append(job_id)
        else:
            outcome.refused.append((job_id, reason))


async def run(client: ConveyorClient, action: str, ids: list[str], outcome: Outcome) -> Outcome:
    """Apply ``action`` to ``ids``, filling ``outcome``."""
    outcome.matched = len(ids)
    if action == "cancel":

        async def cancel(job_id: str) -> None:
            await client.cancel_job(job_id, reason="cancelled in bulk from the dashboard")

        await _each(ids, cancel, outcome)
    elif action == "retry":

        async def retry(job_id: str) -> None:
            queue, _ = parse_job_id(job_id) or ("", "")
            await client.retry_dead_letters(queue, job_id)

        await _each(ids, retry, outcome)
    elif action == "delete":
        for start in range(0, len(ids), PAGE):
            reply = await client.delete_jobs(ids[start : start + PAGE])
            outcome.done.extend(reply.deleted)
            outcome.refused.extend((r.job_id, r.reason) for r in reply.refused)
    else:
        raise InvalidArgument({"action": f"must be one of {', '.join(ACTIONS)}"})
    return outcome
