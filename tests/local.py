"""The whole app without Ray: stage servers in threads, the engine and the FastAPI app in-process."""

from __future__ import annotations

from contextlib import contextmanager

from fastapi.testclient import TestClient
from transformers import AutoConfig, AutoTokenizer

from app.api import create_app
from app.completions import ModelInfo
from app.engine import Engine, EngineConfig
from app.pipeline import PipelineClient
from app.stage_server import StageServer
from stages import Stage


@contextmanager
def local_app(model_dir: str, ranges: list[tuple[int, int]], name: str = "model", **engine_kwargs):
    """Yields (TestClient, engine, stage servers) for the model split into `ranges`."""
    config = EngineConfig(**{"max_model_len": 512, **engine_kwargs})
    servers = [StageServer(Stage(model_dir, start, end, num_slots=config.max_batch_size,
                                 max_len=config.max_model_len)) for start, end in ranges]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    pipeline = PipelineClient()
    pipeline.set_route([s.address for s in servers])
    engine = Engine(pipeline, config)
    info = ModelInfo(name=name, tokenizer=tokenizer, vocab_size=hf_config.vocab_size,
                     max_model_len=config.max_model_len, eos_token_ids=(hf_config.eos_token_id,))
    try:
        with TestClient(create_app(engine, info)) as client:
            yield client, engine, servers
    finally:
        pipeline.close()
        for server in servers:
            server.close()
