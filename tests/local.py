"""The whole app without Ray: stage servers in threads, the engine and the FastAPI app in-process."""

from __future__ import annotations

import os
from contextlib import contextmanager

from fastapi.testclient import TestClient
from transformers import AutoConfig, AutoTokenizer

from app.api import create_app
from app.embeddings import Embedder
from app.generation import ModelInfo
from app.engine import Engine, EngineConfig, Replica
from app.pipeline import PipelineClient
from app.stage_server import StageServer
from placement import kv_pool_blocks
from stages import Stage
from stages.encoder import EncoderStage, is_encoder, read_encoder_config


def replicas_of(servers: list[StageServer], num_slots: int) -> list[Replica]:
    """One replica per stage: the stage servers in pipeline order (an encoder's have no KV cache)."""
    return [Replica(f"stage{i}", i, server.address, num_slots,
                    **({"num_blocks": server.stage.cache.num_blocks, "block_size": server.stage.cache.block_size}
                       if server.stage.cache is not None else {}))
            for i, server in enumerate(servers)]


@contextmanager
def http_server(app):
    """Serves `app` with uvicorn on a free port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    # The server gets the bound socket itself: a port number alone could be taken before it binds.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def model_info(model_dir: str, name: str, max_model_len: int) -> ModelInfo:
    """What the HTTP layer knows of the checkpoint's model (an encoder's longest input: its own)."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    encoder = is_encoder(hf_config)
    return ModelInfo(name=name, tokenizer=AutoTokenizer.from_pretrained(model_dir), vocab_size=hf_config.vocab_size,
                     max_model_len=read_encoder_config(model_dir).max_seq_length if encoder else max_model_len,
                     eos_token_ids=(hf_config.eos_token_id,), task="embed" if encoder else "generate")


@contextmanager
def local_app(model_dir: str, ranges: list[tuple[int, int]], name: str = "model", http: bool = False,
              quantizations: list[str] | None = None, api_keys: tuple[str, ...] = (), kv_tokens: int | None = None,
              block_size: int = 16, lora_modules: dict[str, str] | None = None, **engine_kwargs):
    """Yields (TestClient, engine, stage servers) for the model split into `ranges`; with `http`, a
    real HTTP server's URL instead of the TestClient; with `api_keys`, clients must send one. Each
    stage's KV pool holds `kv_tokens` (default: `max_batch_size` sequences of `max_model_len`); every
    stage holds the LoRA adapters `lora_modules` (name -> directory)."""
    config = EngineConfig(**{"max_model_len": 512, **engine_kwargs})
    quantizations = quantizations or ["none"] * len(ranges)
    secret = os.urandom(32)  # the application's data-plane secret
    num_blocks = kv_pool_blocks(kv_tokens or config.max_batch_size * config.max_model_len, block_size)
    info = model_info(model_dir, name, config.max_model_len)
    info.adapters = dict(lora_modules or {})
    servers = [StageServer(EncoderStage(model_dir, start, end) if info.task == "embed" else
                           Stage(model_dir, start, end, num_blocks=num_blocks, block_size=block_size, quantization=q,
                                 lora_modules=lora_modules),
                           secret) for (start, end), q in zip(ranges, quantizations)]
    pipeline = PipelineClient(secret)
    engine = Engine(pipeline, config, len(servers))
    engine.set_replicas(replicas_of(servers, config.max_batch_size))
    embedder = Embedder(lambda: engine.replicas.values(), len(servers), pipeline, config.max_batch_size,
                        config.max_num_batched_tokens) if info.task == "embed" else None
    try:
        app = create_app(engine, info, api_keys=api_keys, embedder=embedder)
        if http:
            with http_server(app) as url:
                yield url, engine, servers
        else:
            with TestClient(app) as client:
                yield client, engine, servers
    finally:
        pipeline.close()
        for server in servers:
            server.close()
