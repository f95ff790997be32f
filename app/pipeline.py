"""The ingress end of the data plane: send a step into the stage chain, await its tokens."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

import torch

from app import wire
from app.transport import Connections, HandshakeFailed, connect_authenticated, listen, serve_connections
from stages.sampler import SamplingSpec, answer_sizes

logger = logging.getLogger(__name__)


def step_inputs(token_rows: list[list[int]], packed: bool) -> torch.Tensor:
    """A step's token ids: each row right-padded to the longest (B, T), or `packed` into one row
    (1, N) of every row's tokens one after another, as the stages take both."""
    if packed:
        return torch.tensor([[token for row in token_rows for token in row]])
    inputs = torch.zeros((len(token_rows), max(len(row) for row in token_rows)), dtype=torch.long)
    for i, row in enumerate(token_rows):
        inputs[i, :len(row)] = torch.tensor(row)
    return inputs


# Handshakes a watch tries before it counts a stage that listens but does not answer as gone.
WATCH_ATTEMPTS = 5


class StepFailed(RuntimeError):
    """A step did not come back: a stage failed, vanished or timed out."""


class PipelineClient:
    """Sends steps along a route (stage replica addresses in order) and collects their results.

    Results come back to our own listening socket, from the last stage, and resolve the
    future of their step on the event loop that sent it.

    Args:
        secret: the application's secret: every connection, in and out, proves it knows it.
        host: address to listen on for results (reachable from the last stage's node).
        limits: what a result may be (`app.wire.Limits`).
        on_refused: called with the reason when a connection or message is refused.
    """

    def __init__(self, secret: bytes, host: str = "127.0.0.1", limits: wire.Limits = wire.Limits(),
                 on_refused=None):
        self.secret = secret
        self._server, self.reply_address = listen(host)
        self._out = Connections(secret)
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, frozenset, int, tuple | None]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._watched: dict[str, list] = {}
        self._sending: dict[str, asyncio.Future] = {}  # per address, the last send under way (on the loop)
        serve_connections(self._server, self._on_message, secret, limits, on_refused=on_refused)

    def _on_message(self, message: wire.Message) -> None:
        if not isinstance(message, (wire.Result, wire.Error)):
            raise wire.WireError(f"the ingress takes no {message.kind} message")
        with self._lock:
            entry = self._pending.pop(message.step, None)
        if entry is None:
            return  # a step we gave up on
        loop, future, _, rows, sizes = entry
        if isinstance(message, wire.Error):
            loop.call_soon_threadsafe(_resolve, future, None, StepFailed(message.message))
            return
        # what the step asked for: every row's logits, or (with `want`) a token per row, and as
        # many log-probabilities and alternatives as its rows asked for
        sampled = message.sampled
        if (sizes is None and (message.logits is None or message.logits.shape[0] != rows)
                or sizes is not None and (sampled is None or (sampled.tokens.shape[0], sampled.logprobs.shape[0],
                                                               sampled.top_ids.shape[0]) != (rows, *sizes))):
            loop.call_soon_threadsafe(_resolve, future, None, StepFailed(
                f"step {message.step}: the result does not answer the step's {rows} rows"))
        else:
            loop.call_soon_threadsafe(_resolve, future, message, None)

    async def step(self, route: list[str], inputs: torch.Tensor, tables: list[list[list[int]]], starts: list[int],
                   num_new: list[int], *, all_logits: bool = False, want: tuple[int, ...] = (),
                   sampling: tuple[SamplingSpec | None, ...] = (), scoring: tuple = (),
                   copies: list[list[tuple[int, int]]] | None = None, adapters: tuple[int, ...] = (),
                   timeout: float | None = None) -> wire.Result:
        """Runs one batched step through one replica of every stage.

        Args:
            route: the data-plane address of each stage's replica, in pipeline order.
            inputs: (B, T) token ids, rows right-padded.
            tables: for each stage of the route, the KV cache blocks of each row there.
            starts: first new position of each row.
            num_new: real new tokens of each row.
            all_logits: return logits at every position (B, T, V) instead of the last (B, V).
            want: per row, what the last stage returns (`wire.WANT_*`); empty: every row's logits.
            sampling: with `want`, per row, how a WANT_SAMPLE row samples (None for the others).
            scoring: with `want` and `all_logits`, per row None or (alternatives, the token ids its
                positions predict): the rows that score their prompt (echo).
            copies: for each stage of the route, (source, destination) KV blocks to copy before
                the step (a beam's blocks, see `app.blocks.BlockPool.unshare`).
            adapters: each row's LoRA adapter (0: none); empty: none in the step.
            timeout: seconds to wait for the result before the step counts as failed.

        Returns:
            The last stage's `wire.Result`: without `want`, float32 logits ((B, T, V) with
            `all_logits`); with it, each row's token and what its rows asked for (`Result.sampled`).

        Raises:
            StepFailed: a stage reported an error, could not be reached, or timed out.
        """
        step_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            sizes = answer_sizes(sampling, scoring) if want else None
            self._pending[step_id] = (loop, future, frozenset(route), len(starts), sizes)
        message = wire.Step(step_id, tuple(route[1:]) + (self.reply_address,),
                            tuple(tuple(map(tuple, stage)) for stage in tables),
                            tuple(starts), tuple(num_new), all_logits, inputs, tuple(want), tuple(sampling),
                            tuple(scoring), tuple(tuple(map(tuple, stage)) for stage in copies) if any(copies or ())
                            else (), tuple(adapters) if any(adapters) else ())
        try:
            await self._send(route[0], message)
            return await asyncio.wait_for(future, timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise StepFailed(f"step {step_id} failed: {exc!r}") from exc
        finally:
            with self._lock:
                self._pending.pop(step_id, None)

    async def _send(self, address: str, message: wire.Message) -> None:
        """Sends `message` to `address` after the messages sent there before it: a prompt's next
        chunk must reach the stage after the chunk before, even when that one went from a thread."""
        before, done = self._sending.get(address), asyncio.get_running_loop().create_future()
        self._sending[address] = done
        try:
            if before is not None and not before.done():
                await asyncio.shield(before)
            rest = self._out.send_nowait(address, message)  # on the loop: a thread's turn can take ms
            if rest is not None:
                await asyncio.to_thread(rest)
        finally:
            done.set_result(None)
            if self._sending.get(address) is done:
                del self._sending[address]

    def watch(self, address: str, on_gone=None) -> None:
        """Watches the stage replica at `address` for its death.

        A watch is a connection the stage never writes to: when the stage's process dies, its
        end closes, every step in flight through it fails at once instead of waiting for a
        timeout, and `on_gone()` is called (from the watch's thread).
        """
        with self._lock:
            callbacks = self._watched.get(address)
            if callbacks is None:
                self._watched[address] = callbacks = []
                threading.Thread(target=self._watch, args=(address,), daemon=True, name="stagewise-watch").start()
            if on_gone is not None:
                callbacks.append(on_gone)

    def release(self, address: str) -> None:
        """Tells a draining stage replica that it holds no sequence any more."""
        self.notify(address, wire.Released())

    def notify(self, address: str, message: wire.Message) -> None:
        """Sends a stage replica a message that needs no answer (if it is still there)."""
        try:
            self._out.send(address, message)
        except OSError:
            pass

    def _watch(self, address: str) -> None:
        # Gone: nothing listens at the address, or the watch connection, once made, closed. A
        # handshake that fails or times out is tried again: the stage may be too busy to answer,
        # or not know the secret yet (it has just started); a hung one is the step timeout's.
        for attempt in range(WATCH_ATTEMPTS):
            try:
                sock = connect_authenticated(address, self.secret, timeout=10)
            except (HandshakeFailed, TimeoutError) as exc:
                logger.warning("watch of %s: %s (attempt %d of %d)", address, exc, attempt + 1, WATCH_ATTEMPTS)
                time.sleep(1.0)
                continue
            except OSError:
                break
            try:
                while sock.recv(1):
                    pass
            except OSError:
                pass
            break
        logger.warning("the stage at %s went away", address)
        with self._lock:
            callbacks = self._watched.pop(address, [])
        self.fail_pending(f"stage at {address} went away", address)
        for on_gone in callbacks:
            on_gone()

    def fail_pending(self, message: str, address: str) -> None:
        """Fails the steps in flight through `address`: their caches can no longer be trusted."""
        with self._lock:
            failed = [key for key, (_, _, route, *_) in self._pending.items() if address in route]
            entries = [self._pending.pop(key) for key in failed]
        for loop, future, *_ in entries:
            loop.call_soon_threadsafe(_resolve, future, None, StepFailed(message))

    def close(self) -> None:
        self._server.close()
        self._out.close()


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
