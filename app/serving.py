"""How a generation endpoint answers: admission, the start, the whole answer or the stream, and the
barrier that keeps one request's failure its own. Each endpoint module (`completions`, `chat`)
adds its route with `Serving` and formats its own answers."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.engine import Engine, Overloaded, TooLong
from app.errors import (INTERNAL, SERVICE_UNAVAILABLE, BadRequest, NotFound, Overloaded as OverloadedError,
                        Unavailable, error_body)
from app.generation import Generation, ModelInfo, PipelineError, SequenceFailed
from app.health import unavailable_reason

logger = logging.getLogger(__name__)


class Serving:
    """What an endpoint needs from the app.

    Args:
        engine: schedules the sequences over the stages.
        model: the served model.
        metrics: counts failures of a request's own code (`sequence_failed`); None: not counted.
        report: returns the stages' report (`app.health.stage_report`).
        embedder: runs an encoder's texts through the stages (`app.embeddings.Embedder`; None:
            the model generates).
    """

    def __init__(self, engine: Engine, model: ModelInfo, metrics, report: Callable[[], list[dict]], embedder=None):
        self.engine, self.model, self.metrics, self.report = engine, model, metrics, report
        self.embedder = embedder

    def admit(self, requested_model: str, task: str = "generate") -> int:
        """The LoRA adapter a request names (0: the model itself, see `ModelInfo.adapter_index`).
        Raises 404 for a name not served, 400 for an endpoint of another task than the model's
        ("generate": completions and chat; "embed": embeddings), 503 while a stage cannot serve."""
        adapter = self.model.adapter_index(requested_model)
        if adapter is None:
            raise NotFound(f"The model `{requested_model}` does not exist.", param="model", code="model_not_found")
        if task != self.model.task:
            api = {"generate": "the Completions and Chat Completions APIs", "embed": "the Embeddings API"}[task]
            raise BadRequest(f"The model `{requested_model}` does not support {api}: it is "
                             f"{'an embedding' if self.model.task == 'embed' else 'a generative'} model",
                             param="model", code="model_not_supported")
        reason = unavailable_reason(self.report())
        if reason is not None:
            raise Unavailable(reason)
        return adapter

    async def answer(self, request: Request, generation: Generation, stream: bool,
                     lines: Callable[[], AsyncIterator[str]], whole: Callable[[], Awaitable[dict]]):
        """Starts `generation` and answers with `lines()` (SSE) or `await whole()` (JSON).

        A failure of the generation ends a stream with an `error` event and `[DONE]`, or answers
        500/503 with OpenAI's error object; however the answer ends, the sequences are aborted
        (a client that went away frees its slots).
        """
        try:
            generation.start()
        except Overloaded as exc:
            generation.abort()
            raise OverloadedError(f"server overloaded: {exc}", retry_after=1) from exc
        except TooLong as exc:
            generation.abort()
            raise BadRequest(str(exc), param="max_tokens", code="kv_cache_exceeded") from None
        if stream:
            return StreamingResponse(self._guarded(generation, lines()), media_type="text/event-stream")
        try:
            body = await _unless_disconnected(request, whole())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a barrier: this request fails, nothing else
            status, error = self._error_of(generation, exc)
            return JSONResponse(error, status_code=status)
        finally:
            generation.abort()  # a no-op when done; frees the slots when the client went away
        return JSONResponse(body)

    async def _guarded(self, generation: Generation, lines: AsyncIterator[str]):
        try:
            async for line in lines:
                yield line
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream's barrier
            yield f"data: {json.dumps(self._error_of(generation, exc)[1])}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            generation.abort()

    def _error_of(self, generation: Generation, exc: Exception) -> tuple[int, dict]:
        """(status, OpenAI error body) of a request whose generation failed. An unexpected
        failure of the request's own code (detokenizing, stop strings, formatting) is logged,
        counted, and is that request's 500."""
        if isinstance(exc, PipelineError):
            return 503, error_body(str(exc), SERVICE_UNAVAILABLE, code="pipeline_unavailable")
        if not isinstance(exc, SequenceFailed):
            logger.exception("request %s failed", generation.id, exc_info=exc)
            if self.metrics is not None:
                self.metrics.sequence_failed("text")
            exc = SequenceFailed(f"generation failed: {type(exc).__name__}: {exc}")
        return 500, error_body(str(exc), INTERNAL, code="sequence_failed")


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


def sse(chunk) -> str:
    """One server-sent event of a pydantic chunk."""
    return f"data: {chunk.model_dump_json()}\n\n"
