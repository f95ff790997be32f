"""The HTTP surface: an OpenAI-compatible FastAPI app over an `Engine`."""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.completions import Completion, ModelInfo, PipelineError
from app.engine import Engine, Overloaded
from app.errors import (SERVICE_UNAVAILABLE, NotFound, Overloaded as OverloadedError, Unavailable, error_body,
                        error_response, install_error_handlers, parse_json_body)
from app.health import health_body, stage_report, unavailable_reason
from app.protocol import CompletionRequest, ModelCard, ModelList

logger = logging.getLogger(__name__)


def create_app(engine: Engine, model: ModelInfo, metrics=None, announced=None) -> FastAPI:
    """Builds the app: `GET /v1/models`, `POST /v1/completions`, `GET /health`.

    Args:
        engine: schedules the sequences over the stages.
        model: the served model's name, tokenizer and limits.
        metrics: has `request_finished(status)`, told the HTTP status of every completions
            response, errors included (e.g. `app.metrics.IngressMetrics`; None: not counted).
        announced: returns what the stage replicas announced, loading or failed ones included
            (see `app.health`); None: the engine's replicas, every one ready.

    Returns:
        The FastAPI app (Serve wraps it as the ingress; tests use it directly).
    """
    app = FastAPI(title="stagewise", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if metrics is not None:
        app.add_middleware(CountStatuses, metrics=metrics, path="/v1/completions")

    def report() -> list[dict]:
        entries = announced() if announced is not None else [
            {"id": r.id, "stage": r.stage, "state": "ready", "draining": r.draining, "node": r.address.rpartition(":")[0]}
            for r in engine.replicas.values()]
        held = {r["id"]: r["sequences"] for r in engine.replica_load()}
        return stage_report(engine.num_stages, entries, held)

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
            return StreamingResponse(_guarded_stream(completion), media_type="text/event-stream")
        try:
            response = await _unless_disconnected(request, completion.run())
        except PipelineError as exc:
            return error_response(503, str(exc), SERVICE_UNAVAILABLE, code="pipeline_unavailable")
        finally:
            completion.abort()  # a no-op when done; frees the slots when the client went away
        return JSONResponse(response.model_dump())

    return app


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


async def _guarded_stream(completion: Completion):
    """The completion's SSE stream; aborts its sequences however the stream ends."""
    try:
        async for line in completion.stream():
            yield line
    except PipelineError as exc:
        yield f"data: {json.dumps(error_body(str(exc), SERVICE_UNAVAILABLE, code='pipeline_unavailable'))}\n\n"
    except asyncio.CancelledError:
        raise
    finally:
        completion.abort()
