"""The dashboard's web application: server-rendered pages, a JSON POST per action, and Watch relayed as SSE.

It reads and changes Conveyor only through the gRPC APIs (a :class:`ConveyorClient` on the producer's
and the results service's addresses); it never opens Redis or PostgreSQL itself.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from conveyor.common import auth, logs
from conveyor.common.client import ConveyorClient
from conveyor.common.errors import ConveyorError, InvalidArgument
from conveyor.dashboard import bulk, filters, views
from conveyor.dashboard.login import (
    CSRF_HEADER,
    LOGIN_COOKIE,
    LOGIN_FORM_S,
    SESSION_COOKIE,
    LoginSettings,
    Session,
    csrf_ok,
    safe_next,
)
from conveyor.v1 import admin_service_pb2, producer_service_pb2, results_service_pb2

HERE = Path(__file__).resolve().parent
log = logs.get_logger(__name__)

# gRPC status -> HTTP status of the page or the action that hit it.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

Handler = Callable[[Request], Awaitable[Response]]


#: The largest sign-in form the dashboard reads (a token and two short fields).
MAX_LOGIN_FORM = 8192


def create_app(
    client: ConveyorClient,
    *,
    read_only: bool = False,
    chart_js: Path | None = None,
    login: LoginSettings | None = None,
) -> Starlette:
    """The ASGI app. ``client`` must have a results address (jobs, events and history come from there).

    With ``login``, each person signs in with their own token and ``client`` must present
    ``auth.CALL_TOKEN`` (``per_call_token=True``); pages and actions run with that person's token.
    """
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["read_only"] = read_only
    templates.env.globals["chart_js"] = chart_js is not None
    templates.env.globals["login"] = login is not None
    signer = login.signer() if login is not None else None

    def session_of(request: Request) -> Session | None:
        session: Session | None = getattr(request.state, "session", None)
        return session

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        session = session_of(request)
        # Signed in, only an admin sees the action buttons (the APIs would refuse the others anyway).
        context.setdefault("read_only", read_only or (signer is not None and (session is None or not session.admin)))
        context.setdefault("session", session)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    async def error_page(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ConveyorError):
            status = HTTP_STATUS.get(exc.code, 500)
            code, message = exc.code.name, exc.message
        elif isinstance(exc, HTTPException):
            status, code, message = exc.status_code, "", exc.detail
        else:
            raise exc
        if request.method == "POST" or request.url.path.startswith("/api/"):
            return JSONResponse({"code": code, "error": message}, status_code=status)
        return page(request, "error.html", status_code=status, status=status, code=code, message=message)

    # ---- sign-in (CONVEYOR_DASHBOARD_LOGIN) ---------------------------------------------------------

    def https(request: Request) -> bool:
        return request.url.scheme == "https"

    def signed_out(request: Request, why: str) -> Response:
        """Back to the sign-in page (an action or API call gets 401 with where to sign in); the cookie goes."""
        response: Response
        if request.method == "POST" or request.url.path.startswith("/api/"):
            error = why or "sign in first"
            response = JSONResponse({"code": "UNAUTHENTICATED", "error": error, "login": "/login"}, 401)
        else:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            params = {"next": target, **({"expired": "1"} if why else {})}
            response = RedirectResponse(f"/login?{urlencode(params)}", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=https(request))
        return response

    def signed_in(handler: Handler) -> Handler:
        """``handler`` run with the signed-in person's token; POSTs need their CSRF token and the admin role."""
        if signer is None:
            return handler

        async def guarded(request: Request) -> Response:
            session = signer.read(request.cookies.get(SESSION_COOKIE))
            if session is None:
                return signed_out(request, "")
            request.state.session = session
            if request.method == "POST":
                if not csrf_ok(session.csrf, request.headers.get(CSRF_HEADER)):
                    error = "missing or wrong CSRF token: reload the page and try again"
                    return JSONResponse({"code": "PERMISSION_DENIED", "error": error}, 403)
                if not session.admin:
                    error = f"signed in as {session.name} ({session.role}): only an admin may change anything"
                    return JSONResponse({"code": "PERMISSION_DENIED", "error": error}, 403)
            reset = auth.CALL_TOKEN.set(session.token)
            try:
                return await handler(request)
            except ConveyorError as exc:
                if exc.code != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                # The services no longer know the token (revoked from the token file): sign the person out.
                log.info("dashboard session ended", name=session.name, error=exc.message)
                return signed_out(request, exc.message)
            finally:
                auth.CALL_TOKEN.reset(reset)

        return guarded

    def login_form(request: Request, error: str = "", status_code: int = 200, target: str = "") -> Response:
        nonce = secrets.token_urlsafe(32)
        response = page(
            request,
            "login.html",
            status_code=status_code,
            error=error,
            expired=request.query_params.get("expired") == "1" and not error,
            next=safe_next(target or request.query_params.get("next")),
            login_csrf=nonce,
            read_only=False,  # nobody is signed in yet: no "read-only" badge, no navigation
            sign_in_page=True,
        )
        # Double submit: the form's hidden field must equal this cookie, which another site cannot read or set.
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_FORM_S,
            path="/login",
            httponly=True,
            samesite="strict",
            secure=https(request),
        )
        return response

    async def login_page(request: Request) -> Response:
        if signer is None:
            raise HTTPException(404, "sign-in is off (CONVEYOR_DASHBOARD_LOGIN is not set)")
        if request.method != "POST":
            return login_form(request)
        body = await request.body()
        if len(body) > MAX_LOGIN_FORM:
            return login_form(request, "The form is too large.", 413)
        form = parse_qs(body.decode(errors="replace"), max_num_fields=10)

        def field(name: str) -> str:
            return (form.get(name) or [""])[0]

        target = field("next")
        if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), field("csrf")):
            return login_form(request, "The sign-in form had expired: try again.", 403, target)
        token = field("token").strip()
        if not token:
            return login_form(request, "Enter your token.", 400, target)
        reset = auth.CALL_TOKEN.set(token)
        try:
            me = await client.who_am_i()
        except ConveyorError as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                log.info("dashboard sign-in refused", error=exc.message)
                return login_form(request, f"Sign-in refused: {exc.message}.", 401, target)
            status = HTTP_STATUS.get(exc.code, 502)
            return login_form(request, f"Cannot check the token: {exc.code.name}: {exc.message}", status, target)
        finally:
            auth.CALL_TOKEN.reset(reset)
        if not me.authentication:
            # Any string would "sign in" as an admin: say so rather than pretend to check anything.
            error = (
                "The services check no tokens (no CONVEYOR_AUTH_TOKENS_FILE), so a sign-in would protect nothing: "
                "turn tokens on, or run the dashboard without CONVEYOR_DASHBOARD_LOGIN."
            )
            return login_form(request, error, 409, target)
        role = admin_service_pb2.Role.Name(me.role).removeprefix("ROLE_").lower()
        name = me.name
        value, _ = signer.issue(token, name, role, tuple(me.queues))
        log.info("dashboard sign-in", name=name, role=role)
        response = RedirectResponse(safe_next(target), 303)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=signer.lifetime_s,
            path="/",
            httponly=True,
            samesite="strict",
            secure=https(request),
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict", secure=https(request))
        return response

    async def logout(request: Request) -> Response:
        if signer is None:
            raise HTTPException(404, "sign-in is off (CONVEYOR_DASHBOARD_LOGIN is not set)")
        session = signer.read(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            body = await request.body()
            presented = (parse_qs(body[:MAX_LOGIN_FORM].decode(errors="replace")).get("csrf") or [""])[0]
            if not csrf_ok(session.csrf, presented or request.headers.get(CSRF_HEADER)):
                raise HTTPException(403, "missing or wrong CSRF token: reload the page and sign out again")
            log.info("dashboard sign-out", name=session.name)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=https(request))
        return response

    # ---- pages -------------------------------------------------------------------------------------

    async def overview(request: Request) -> Response:
        window = request.query_params.get("window", "hour")
        if window not in views.SERIES_WINDOWS:
            raise InvalidArgument({"window": f"must be one of {', '.join(views.SERIES_WINDOWS)}"})
        queues = [views.queue_row(q) for q in await client.list_queues()]
        series: dict[str, Any] | None = None
        series_unavailable = ""
        try:
            series = views.series_view(window, await client.get_job_series(views.SERIES_WINDOWS[window]))
        except ConveyorError as exc:
            # The queues come from the producer; the charts from the results service, which may be down
            # or too slow: the page shows the queues and says why the charts are missing.
            log.warning("job series unavailable", window=window, code=exc.code.name, error=exc.message)
            series_unavailable = f"{exc.code.name}: {exc.message}"
        return page(
            request,
            "overview.html",
            queues=queues,
            window=window,
            windows=list(views.SERIES_WINDOWS),
            series=series,
            series_json=json.dumps(series),
            series_unavailable=series_unavailable,
        )

    async def queue_page(request: Request) -> Response:
        queue = request.path_params["queue"]
        stats = await client.get_queue_stats(queue)
        limits = await client.get_limits(queue)
        finished = views.finished_view(stats.finished) if stats.HasField("finished") else []
        return page(
            request,
            "queue.html",
            q=views.queue_row(stats.stats),
            limits=views.limits_view(limits),
            key_limits=views.key_limits_view(limits),
            limits_summary=views.limits_summary(limits),
            finished=finished,
            finished_json=json.dumps(finished),
            finished_unavailable=stats.finished_unavailable,
        )

    async def jobs_page(request: Request) -> Response:
        pairs = filters.filter_pairs(request.query_params.multi_items())
        response = await client.list_jobs(
            filters.list_jobs_request(pairs, page_size=50, page_token=request.query_params.get("page_token", ""))
        )
        return page(
            request,
            "jobs.html",
            jobs=[views.job_row(j) for j in response.jobs],
            next_page_token=response.next_page_token,
            next_params=[*pairs, ("page_token", response.next_page_token)],
            filters=dict(pairs),
            filter_pairs=pairs,
            where=[v for k, v in pairs if k == "where"],
            labels=[v for k, v in pairs if k == "label"],
            states=views.JOB_STATES,
        )

    async def job_page(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await client.get_job(job_id)
        events: list[dict[str, Any]] = []
        history_unavailable = ""
        after = ""
        try:
            while True:
                chunk = await client.list_job_events(job_id, after_event_id=after)
                events.extend(views.event_view(e) for e in chunk.events)
                if not chunk.has_more or not chunk.events:
                    break
                after = chunk.events[-1].id
        except ConveyorError as exc:
            # The job itself came from the producer. NOT_FOUND: the results service has not recorded
            # it yet (it projects the event streams a moment later). UNAVAILABLE: it is down. Either
            # way the page shows the job, and the live relay (Watch replays from the first event)
            # fills the timeline.
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                log.warning("job history unavailable", job_id=job_id, code=exc.code.name, error=exc.message)
                history_unavailable = f"{exc.code.name}: {exc.message}"
            elif exc.code != grpc.StatusCode.NOT_FOUND:
                raise
        row = views.job_row(job)
        return page(
            request,
            "job.html",
            job=row,
            events=events,
            history_unavailable=history_unavailable,
            final=row["state"] in views.FINAL_STATES,
        )

    async def job_payload(request: Request) -> Response:
        job = await client.get_job(request.path_params["job_id"])
        return JSONResponse({"payload": views.payload_of(job)})

    async def watch_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        after = request.headers.get("last-event-id", "")
        await client.get_job(job_id)  # a missing job is a 404 here, before the stream starts

        token = auth.CALL_TOKEN.get()

        async def stream() -> AsyncIterator[str]:
            # The body is sent after the handler returned (and its sign-in context with it): present the token here.
            auth.CALL_TOKEN.set(token)
            try:
                async for event in client.watch(job_id, after_event_id=after):
                    view = views.event_view(event)
                    yield f"id: {view['id']}\ndata: {json.dumps(view)}\n\n"
                    if view["final"]:
                        break
            except ConveyorError as exc:
                log.warning("watch relay failed", job_id=job_id, code=exc.code.name, error=exc.message)
                yield f"event: failure\ndata: {json.dumps({'code': exc.code.name, 'error': exc.message})}\n\n"
                return
            yield "event: end\ndata: {}\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def dead_letters_page(request: Request) -> Response:
        queue = request.path_params["queue"]
        response = await client.list_dead_letters(
            queue, page_size=100, page_token=request.query_params.get("page_token", "")
        )
        return page(
            request,
            "dead_letters.html",
            queue=queue,
            letters=[views.dead_letter_view(d) for d in response.dead_letters],
            next_page_token=response.next_page_token,
        )

    async def workers_page(request: Request) -> Response:
        workers = [views.worker_view(w) for w in await client.list_workers()]
        return page(request, "workers.html", workers=workers)

    async def schedules_page(request: Request) -> Response:
        response = await client.list_schedules(page_size=100, page_token=request.query_params.get("page_token", ""))
        return page(
            request,
            "schedules.html",
            schedules=[views.schedule_view(s) for s in response.schedules],
            next_page_token=response.next_page_token,
        )

    async def schedule_edit_page(request: Request) -> Response:
        schedule = await client.get_schedule(request.path_params["schedule_id"])
        return page(request, "schedule_edit.html", s=views.schedule_view(schedule), form=views.schedule_form(schedule))

    # ---- actions (JSON POSTs) ----------------------------------------------------------------------

    def action(fn: Callable[[Request, dict[str, Any]], Awaitable[dict[str, Any]]]) -> Handler:
        async def handler(request: Request) -> Response:
            if read_only:
                return JSONResponse({"code": "PERMISSION_DENIED", "error": "the dashboard is read-only"}, 403)
            # Only JSON bodies: a cross-site form cannot send one without a CORS preflight we never allow.
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return JSONResponse({"code": "INVALID_ARGUMENT", "error": "send Content-Type: application/json"}, 415)
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise InvalidArgument({"body": "must be a JSON object"})
            result = await fn(request, body)
            logged = {k: v for k, v in body.items() if k not in ("payload", "job_ids")}
            if isinstance(body.get("job_ids"), list):
                logged["job_count"] = len(body["job_ids"])
            log.info("dashboard action", path=request.url.path, **logged)
            return JSONResponse(result)

        return handler

    async def pause(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return {"changed": await client.pause_queue(request.path_params["queue"])}

    async def resume(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return {"changed": await client.resume_queue(request.path_params["queue"])}

    def one_or_all(body: dict[str, Any]) -> tuple[str, bool]:
        job_id, everything = body.get("job_id", ""), body.get("all", False)
        if not isinstance(job_id, str) or not isinstance(everything, bool) or bool(job_id) == everything:
            raise InvalidArgument({"job_id": "give either job_id (a string) or all: true"})
        return job_id, everything

    async def retry_dead(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        job_id, everything = one_or_all(body)
        ids = await client.retry_dead_letters(request.path_params["queue"], job_id, all=everything)
        return {"retried": ids}

    async def purge_dead(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        job_id, everything = one_or_all(body)
        return {"purged": await client.purge_dead_letters(request.path_params["queue"], job_id, all=everything)}

    async def cancel(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        state = await client.cancel_job(request.path_params["job_id"], reason="cancelled from the dashboard")
        return {"state": views.state_name(state)}

    async def run_schedule_now(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """Enqueue the schedule's job once, now (not a tick: the next fire time stays), as the CLI's run-now."""
        schedule = await client.get_schedule(request.path_params["schedule_id"])
        job = producer_service_pb2.EnqueueRequest()
        job.CopyFrom(schedule.spec.template)
        return {"job_id": (await client.submit(job)).job_id}

    async def pause_schedule(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        schedule, changed = await client.pause_schedule(request.path_params["schedule_id"])
        return {"changed": changed, "schedule": views.schedule_view(schedule)}

    async def resume_schedule(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        schedule, changed = await client.resume_schedule(request.path_params["schedule_id"])
        return {"changed": changed, "schedule": views.schedule_view(schedule)}

    async def delete_schedule(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return {"deleted": (await client.delete_schedule(request.path_params["schedule_id"])).schedule_id}

    def bulk_filter(raw: object) -> results_service_pb2.ListJobsRequest:
        if not isinstance(raw, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in raw
        ):
            raise InvalidArgument({"filter": "must be the jobs page's filter as a list of [parameter, value] pairs"})
        return filters.list_jobs_request(filters.filter_pairs((k, v) for k, v in raw))

    async def bulk_action(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """Retry, cancel or delete the jobs named in ``job_ids``, or every job ``filter`` matches (up to the cap)."""
        action = request.path_params["action"]
        if action not in bulk.ACTIONS:
            raise InvalidArgument({"action": f"must be one of {', '.join(bulk.ACTIONS)}"})
        if ("job_ids" in body) == ("filter" in body):
            raise InvalidArgument({"job_ids": "give either job_ids (a list) or filter (an object), not both"})
        outcome = bulk.Outcome(action)
        if "filter" in body:
            ids, outcome.more = await bulk.matching_ids(client, bulk_filter(body["filter"]))
        else:
            ids = bulk.chosen_ids(body["job_ids"])
        await bulk.run(client, action, ids, outcome)
        return outcome.answer()

    async def count_jobs(request: Request) -> Response:
        """How many jobs the filter in the query matches, up to the bulk cap (for the confirmation)."""
        matching = filters.list_jobs_request(filters.filter_pairs(request.query_params.multi_items()))
        ids, more = await bulk.matching_ids(client, matching)
        return JSONResponse({"count": len(ids), "more": more, "cap": bulk.MAX_JOBS})

    async def update_schedule(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """Change a schedule's timing (cron with time zone, or an interval) and its job's payload (UpdateSchedule)."""
        schedule = await client.get_schedule(request.path_params["schedule_id"])
        spec = views.edited_spec(schedule.spec, body)
        updated = await client.update_schedule(schedule.schedule_id, spec)
        return {"schedule": views.schedule_view(updated)}

    async def set_limit(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """Set a rate limit (limit per period_seconds) or a concurrency cap (limit): queue, each key or one key."""
        queue, kind = request.path_params["queue"], request.path_params["kind"]
        key, each_key = views.limit_scope(body)
        limit = views.whole_number(body.get("limit"), "limit")
        if kind == "rate":
            period = views.whole_number(body.get("period_seconds"), "period_seconds")
            limits = await client.set_rate_limit(queue, limit, timedelta(seconds=period), key=key, each_key=each_key)
        elif kind == "concurrency":
            limits = await client.set_concurrency_limit(queue, limit, key=key, each_key=each_key)
        else:
            raise HTTPException(404, f"no limit {kind!r}: rate or concurrency")
        return {"limits": views.limits_summary(limits)}

    async def clear_limit(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        queue, kind = request.path_params["queue"], request.path_params["kind"]
        key, each_key = views.limit_scope(body)
        if kind == "rate":
            changed = await client.clear_rate_limit(queue, key=key, each_key=each_key)
        elif kind == "concurrency":
            changed = await client.clear_concurrency_limit(queue, key=key, each_key=each_key)
        else:
            raise HTTPException(404, f"no limit {kind!r}: rate or concurrency")
        return {"changed": changed}

    async def healthz(request: Request) -> Response:
        """Liveness of this process only (no backend call): for a load balancer or `make up`."""
        return PlainTextResponse("ok\n")

    async def chart_bundle(request: Request) -> Response:
        if chart_js is None:
            raise HTTPException(404, "Chart.js is not installed (run npm ci)")
        return FileResponse(chart_js, media_type="text/javascript")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.close()

    def guarded(path: str, handler: Handler, methods: list[str] | None = None) -> Route:
        return Route(path, signed_in(handler), methods=methods)

    routes = [
        guarded("/", overview),
        Route("/healthz", healthz),
        guarded("/queues/{queue}", queue_page),
        guarded("/queues/{queue}/dead-letters", dead_letters_page),
        guarded("/queues/{queue}/pause", action(pause), methods=["POST"]),
        guarded("/queues/{queue}/resume", action(resume), methods=["POST"]),
        guarded("/queues/{queue}/dead-letters/retry", action(retry_dead), methods=["POST"]),
        guarded("/queues/{queue}/dead-letters/purge", action(purge_dead), methods=["POST"]),
        guarded("/jobs", jobs_page),
        guarded("/jobs/bulk/{action}", action(bulk_action), methods=["POST"]),
        guarded("/api/jobs/count", count_jobs),
        guarded("/jobs/{job_id:path}/cancel", action(cancel), methods=["POST"]),
        guarded("/api/payload/{job_id:path}", job_payload),
        guarded("/api/watch/{job_id:path}", watch_job),
        guarded("/jobs/{job_id:path}", job_page),
        guarded("/workers", workers_page),
        guarded("/schedules", schedules_page),
        guarded("/queues/{queue}/limits/{kind}", action(set_limit), methods=["POST"]),
        guarded("/queues/{queue}/limits/{kind}/clear", action(clear_limit), methods=["POST"]),
        guarded("/schedules/{schedule_id:path}/edit", schedule_edit_page),
        guarded("/schedules/{schedule_id:path}/update", action(update_schedule), methods=["POST"]),
        guarded("/schedules/{schedule_id:path}/run-now", action(run_schedule_now), methods=["POST"]),
        guarded("/schedules/{schedule_id:path}/delete", action(delete_schedule), methods=["POST"]),
        guarded("/schedules/{schedule_id:path}/pause", action(pause_schedule), methods=["POST"]),
        guarded("/schedules/{schedule_id:path}/resume", action(resume_schedule), methods=["POST"]),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/vendor/chart.umd.min.js", chart_bundle),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={ConveyorError: error_page, HTTPException: error_page},
        lifespan=lifespan,
    )
