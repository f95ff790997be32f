"""The HTTP surface: an OpenAI-compatible FastAPI app over an `Engine`."""

from __future__ import annotations

import hmac
import importlib.metadata
import json
import logging
import os

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from app import chat, completions, embeddings, tokens
from app.engine import Engine
from app.errors import NotFound, error_body, install_error_handlers
from app.generation import ModelInfo
from app.health import health_body, stage_report
from app.protocol import ModelCard, ModelList
from app.serving import Serving

logger = logging.getLogger(__name__)
try:
    VERSION = importlib.metadata.version("stagewise")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
    VERSION = "unknown"
CHAT_PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")


def create_app(engine: Engine, model: ModelInfo, metrics=None, announced=None, api_keys=(),
               problems=None, embedder=None) -> FastAPI:
    """Builds the app: the OpenAI endpoints (`/v1/models`, `/v1/completions`,
    `/v1/chat/completions`), vLLM's `/tokenize` and `/detokenize`, `/version`, `/health`, and the
    web chat page at `/`. Each generation endpoint is one module with an `add_routes(app, serving)`.

    Args:
        engine: schedules the sequences over the stages.
        model: the served model's name, tokenizer and limits.
        metrics: has `request_finished(status, endpoint)`, told the HTTP status of every
            completions and chat response, errors included (e.g. `app.metrics.IngressMetrics`;
            None: not counted).
        announced: returns what the stage replicas announced, loading or failed ones included
            (see `app.health`); None: the engine's replicas, every one ready.
        problems: returns {stage name: why it cannot come back} (see `app.rehome`).
        api_keys: keys a client must send as `Authorization: Bearer <key>` on every route but
            `/health` and `GET /` (none: no authentication).
        embedder: for an encoder (`model.task == "embed"`), runs `/v1/embeddings`' texts through
            the stages (`app.embeddings.Embedder`).

    Returns:
        The FastAPI app (Serve wraps it as the ingress; tests use it directly).
    """
    app = FastAPI(title="stagewise", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if metrics is not None:
        app.add_middleware(CountStatuses, metrics=metrics,
                           endpoints={"/v1/completions": "completions", "/v1/chat/completions": "chat",
                                      "/v1/embeddings": "embeddings"})
    if api_keys:
        app.add_middleware(RequireApiKey, keys=tuple(api_keys))

    def report() -> list[dict]:
        entries = announced() if announced is not None else [
            {"id": r.id, "stage": r.stage, "state": "ready", "draining": r.draining, "node": r.address.rpartition(":")[0]}
            for r in engine.replicas.values()]
        load = engine.replica_load()
        return stage_report(engine.num_stages, entries, {r["id"]: r["sequences"] for r in load},
                            problems() if problems is not None else None, {r["id"]: r["blocks"] for r in load})

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = health_body(report(), engine.alive, engine.restarts)
        body["engine"].update(running=engine.num_running, waiting=len(engine.waiting), **engine.stats)
        return JSONResponse(body, status_code=status)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        """The web chat page: static, the same for everyone (a key is typed into the page)."""
        return FileResponse(CHAT_PAGE, media_type="text/html")

    # the model, then its LoRA adapters as vLLM lists them (root: the adapter's directory)
    cards = {model.name: ModelCard(id=model.name, created=model.created, root=model.name,
                                   max_model_len=model.max_model_len)}
    for name, path in model.adapters.items():
        cards[name] = ModelCard(id=name, created=model.created, root=path, parent=model.name,
                                max_model_len=model.max_model_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=list(cards.values()))

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> ModelCard:
        if name not in cards:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return cards[name]

    @app.get("/version")
    async def version() -> dict:
        return {"version": VERSION}

    serving = Serving(engine, model, metrics, report, embedder)
    for endpoint in (completions, chat, tokens, embeddings):
        endpoint.add_routes(app, serving)
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
    """ASGI middleware: tells `metrics.request_finished(status, endpoint)` how each request to one of
    `endpoints` ({path: name}) ended.

    Counted when the response is over (a stream at its end). A request whose handler raised is a
    500 (the outer error handler answers it); one whose client left before any answer is a 499,
    nginx's "client closed request".
    """

    def __init__(self, app, metrics, endpoints: dict[str, str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    def _endpoint(self, path: str) -> str | None:
        # endswith: under a Serve route prefix the path may still carry the prefix
        return next((name for suffix, name in self.endpoints.items() if path.endswith(suffix)), None)

    async def __call__(self, scope, receive, send):
        endpoint = self._endpoint(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
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
            self.metrics.request_finished(status or 499, endpoint)
