"""The HTTP surface: an OpenAI-compatible FastAPI app over an `Engine`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.completions import Completion, ModelInfo, PipelineError, SequenceFailed
from app.engine import Engine, Overloaded
from app.errors import (INTERNAL, SERVICE_UNAVAILABLE, NotFound, Overloaded as OverloadedError, Unavailable, error_body,
                        install_error_handlers, parse_json_body)
from app.health import health_body, stage_report, unavailable_reason
from app.protocol import CompletionRequest, ModelCard, ModelList

logger = logging.getLogger(__name__)


def create_app(engine: Engine, model: ModelInfo, metrics=None, announced=None, api_keys=(),
               problems=None) -> FastAPI:
    """Builds the app: `GET /v1/models`, `POST /v1/completions`, `GET /health`.

    Args:
        engine: schedules the sequences over the stages.
        model: the served model's name, tokenizer and limits.
        metrics: has `request_finished(status)`, told the HTTP status of every completions
            response, errors included (e.g. `app.metrics.IngressMetrics`; None: not counted).
        announced: returns what the stage replicas announced, loading or failed ones included
            (see `app.health`); None: the engine's replicas, every one ready.
        problems: returns {stage name: why it cannot come back} (see `app.rehome`).
        api_keys: keys a client must send as `Authorization: Bearer <key>` on every route but
            `/health` and `GET /` (none: no authentication).

    Returns:
        The FastAPI app (Serve wraps it as the ingress; tests use it directly).
    """
    app = FastAPI(title="stagewise", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if metrics is not None:
        app.add_middleware(CountStatuses, metrics=metrics, path="/v1/completions")
    if api_keys:
        app.add_middleware(RequireApiKey, keys=tuple(api_keys))

    def report() -> list[dict]:
        entries = announced() if announced is not None else [
            {"id": r.id, "stage": r.stage, "state": "ready", "draining": r.draining, "node": r.address.rpartition(":")[0]}
            for r in engine.replicas.values()]
        held = {r["id"]: r["sequences"] for r in engine.replica_load()}
        return stage_report(engine.num_stages, entries, held, problems() if problems is not None else None)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = health_body(report(), engine.alive, engine.restarts)
        body["engine"].update(running=engine.num_running, waiting=len(engine.waiting), **engine.stats)
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model.name, created=model.created, root=model.name,
                                         max_model_len=model.max_model_len)])

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_json_body(request, CompletionRequest)
        if body.model != model.name:
            raise NotFound(f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
        reason = unavailable_reason(report())
        if reason is not None:
            raise Unavailable(reason)
        completion = Completion(body, engine, model)
        try:
            completion.start()
        except Overloaded as exc:
            completion.abort()
            raise OverloadedError(f"server overloaded: {exc}", retry_after=1) from exc
        if body.stream:
            return StreamingResponse(_guarded_stream(completion, metrics), media_type="text/event-stream")
        try:
            response = await _unless_disconnected(request, completion.run())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a barrier: this request fails, nothing else
            if not isinstance(exc, (PipelineError, SequenceFailed)):
                exc = _request_failed(completion, exc, metrics)
            status, error = _error_of(exc)
            return JSONResponse(error, status_code=status)
        finally:
            completion.abort()  # a no-op when done; frees the slots when the client went away
        return JSONResponse(response.model_dump())

    return app


class RequireApiKey:
    """ASGI middleware: `Authorization: Bearer <key>` with one of `keys`, as vLLM's `--api-key`.

    Open: `/health` and `GET /` (the web page, which asks for the key itself). Anything else
    without a known key gets 401 with OpenAI's error object. Every key is compared, each in
    constant time, so the time taken says nothing about which key or how much of it matched.
    """

    OPEN = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/")}

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, tuple(key.encode() for key in keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if (scope["method"], path) in self.OPEN or self._known(scope):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body("Invalid or missing API key: send `Authorization: Bearer <key>`",
                                     "invalid_request_error", code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _known(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        matches = [hmac.compare_digest(given.strip(), key) for key in self.keys]
        return scheme.lower() == b"bearer" and any(matches)


class CountStatuses:
    """ASGI middleware: tells `metrics.request_finished(status)` how each request to `path` ended.

    Counted when the response is over (a stream at its end). A request whose handler raised is a
    500 (the outer error handler answers it); one whose client left before any answer is a 499,
    nginx's "client closed request".
    """

    def __init__(self, app, metrics, path: str):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope, receive, send):
        # endswith: under a Serve route prefix the path may still carry the prefix
        if scope["type"] != "http" or not scope["path"].endswith(self.path):
            return await self.app(scope, receive, send)
        status = None

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = status or 500
            raise
        finally:
            self.metrics.request_finished(status or 499)


async def _unless_disconnected(request: Request, work, poll_s: float = 0.25):
    """Awaits `work`, cancelling it if the client goes away first (the caller then aborts)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
    finally:
        task.cancel()


def _error_of(exc: Exception) -> tuple[int, dict]:
    """(status, OpenAI error body) of a request whose generation failed."""
    if isinstance(exc, PipelineError):
        return 503, error_body(str(exc), SERVICE_UNAVAILABLE, code="pipeline_unavailable")
    return 500, error_body(str(exc), INTERNAL, code="sequence_failed")


def _request_failed(completion: Completion, exc: Exception, metrics) -> SequenceFailed:
    """Logs and counts an unexpected failure of one request's own code (detokenizing, stop
    strings, ...), and turns it into that request's 500."""
    logger.exception("request %s failed", completion.id)
    if metrics is not None:
        metrics.sequence_failed("text")
    return SequenceFailed(f"generation failed: {type(exc).__name__}: {exc}")


async def _guarded_stream(completion: Completion, metrics=None):
    """The completion's SSE stream; a failure ends it with an `error` event, then `[DONE]`; its
    sequences are aborted however the stream ends."""
    try:
        async for line in completion.stream():
            yield line
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the stream's barrier
        if not isinstance(exc, (PipelineError, SequenceFailed)):
            exc = _request_failed(completion, exc, metrics)
        yield f"data: {json.dumps(_error_of(exc)[1])}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        completion.abort()
