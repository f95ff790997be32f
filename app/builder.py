"""The application builder: `serve run serve_config.yaml` or `serve run app:build_app key=value ...`."""

from __future__ import annotations

import logging
import os
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import placement
from app.autoscaling import DEFAULT_STAGE_AUTOSCALING
from app.engine import EngineConfig

logger = logging.getLogger("ray.serve")


class BuilderArgs(BaseModel):
    """`applications[0].args` of serve_config.yaml (or `key=value` after the import path)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint directory; default: SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="model id; default: the directory's name")
    num_stages: Union[int, Literal["auto"]] = Field(2, description="stages, or auto (the planner decides)")
    cluster: str | None = Field(None, description="cluster file to plan for (checked against the live one)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantization: Literal["none", "int8", "nf4"] = Field("none", description="bitsandbytes, every stage")
    stage_quantization: list[Literal["none", "int8", "nf4"]] | None = Field(
        None, description="per stage, overriding quantization (e.g. [nf4, none])")
    plan_reserve_fraction: float = Field(0.05, ge=0, lt=1, description="planner: share of a device kept free")
    plan_kv_tokens: int = Field(4096, ge=1, description="KV cache of each stage replica, in tokens: its block "
                                                        "pool, allocated at start (and what the planner counts)")
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    enable_prefix_caching: bool = Field(True, description="share the KV blocks of equal prompt prefixes")
    max_batch_size: int = Field(16, ge=1, le=1024, description="sequences open at once (KV cache slots)")
    max_model_len: int | None = Field(None, ge=16, description="prompt + output; default min(model, 4096)")
    max_num_batched_tokens: int = Field(512, ge=1, description="tokens per step (vLLM's name): the decoding "
                                        "sequences' tokens, then chunks of prompts in what is left")
    long_prefill_token_threshold: int = Field(24, ge=0, description="the tokens of a prompt's last chunk in a "
                                              "step that carries decoding sequences, earlier chunks as many "
                                              "as cost the same (0: no cap)")
    num_microbatches: int = Field(1, ge=1, le=64, description="steps in flight at once")
    max_queued_requests: int = Field(256, ge=0, description="waiting sequences before 503")
    max_beam_width: int = Field(8, ge=1, le=16, description="the widest beam search (use_beam_search) a request "
                                                            "may ask for (its n)")
    lora_modules: dict[str, str] | list[str] | str | None = Field(
        None, description="LoRA adapters served beside the model: name -> PEFT adapter directory, or vLLM's "
                          "'name=path' strings (a list, or one string, comma-separated); a request names one "
                          "as its model")
    max_loras: int = Field(4, ge=1, description="LoRA adapters in one step at most (vLLM's name)")
    max_lora_rank: int = Field(64, ge=1, description="the highest LoRA rank an adapter may have")
    step_timeout_s: float = Field(60.0, gt=0, description="a step slower than this counts as failed")
    max_step_failures: int = Field(3, ge=1, description="failed steps in a row before a sequence fails")
    node_grace_period_s: float = Field(30.0, ge=0, description="a planned stage's node may be gone this long "
                                                               "before the stage moves to another node")
    max_header_bytes: int = Field(1 << 20, ge=4096, description="data plane: largest message header")
    max_payload_bytes: int = Field(1 << 30, ge=1 << 20, description="data plane: largest message payload "
                                                                  "(a prefill's activations, a step's logits)")
    api_keys: list[str] | None = Field(None, description="keys clients must send as Bearer tokens; "
                                                         "prefer $STAGEWISE_API_KEYS (args show in serve status)")
    stage_num_cpus: float = Field(0.25, ge=0, description="Ray CPUs reserved per stage replica")
    stage_num_threads: int | None = Field(None, ge=1, description="torch threads per stage; default: all cores")
    stage_parallel_min_tokens: int = Field(64, ge=1, description="smaller steps run on one thread")
    # Serve replaces a replica after 3 health checks in a row fail: a hung stage goes in ~3 x timeout.
    health_check_period_s: float = Field(2.0, gt=0, description="Serve health checks of each stage")
    health_check_timeout_s: float = Field(5.0, gt=0, description="a health check slower than this fails")
    stage_num_gpus: float | None = Field(None, ge=0, description="GPUs per stage; default 1 if any")
    stage_autoscaling: dict | None = Field(
        default_factory=lambda: dict(DEFAULT_STAGE_AUTOSCALING),
        description="Serve autoscaling_config of every stage; keys given replace the defaults "
                    "(app.autoscaling); null: one replica per stage")

    @field_validator("stage_autoscaling", mode="after")
    @classmethod
    def _autoscaling_over_defaults(cls, value):
        if value is None:
            return None
        merged = {**DEFAULT_STAGE_AUTOSCALING, **value}
        from ray.serve.config import AutoscalingConfig

        AutoscalingConfig(**merged)  # a clear error now rather than from Serve later
        return merged

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "max_prefill_tokens" in values:
            raise ValueError("max_prefill_tokens is now max_num_batched_tokens (vLLM's name): the tokens of a "
                             "step, decoding sequences' and prompt chunks' together")
        return values

    @field_validator("num_stages", mode="before")
    @classmethod
    def _stages_from_string(cls, value):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value


def resolve_model(args: BuilderArgs) -> tuple[str, str]:
    """(checkpoint directory, served name), converting the default model on first use."""
    if args.model is None:
        from app.default_model import DEFAULT_MODEL_NAME, default_model_dir

        return default_model_dir(), args.served_model_name or DEFAULT_MODEL_NAME
    model_dir = os.path.abspath(os.path.expanduser(args.model))
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise ValueError(f"model: {model_dir} is not a checkpoint directory (no config.json)")
    return model_dir, args.served_model_name or os.path.basename(model_dir.rstrip("/"))


def lora_adapters(args: BuilderArgs, model_dir: str, served_name: str, quantizations: list[str], encoder: bool
                  ) -> dict[str, str]:
    """The LoRA adapters to serve (name -> absolute directory), each checked against the model now,
    so that one that does not fit fails the start with its reason (`stages.lora.check_adapter`).

    Raises:
        ValueError: a malformed entry, a name taken, an encoder or quantized stages, an adapter
            that does not fit the model, or a rank above `max_lora_rank`.
    """
    from stages.lora import check_adapter

    entries = args.lora_modules or {}
    if isinstance(entries, str):  # from the command line: `serve run app:build_app lora_modules=a=/x,b=/y`
        entries = [entry for entry in entries.replace(" ", ",").split(",") if entry]
    if isinstance(entries, list):
        if not all(isinstance(e, str) and "=" in e for e in entries):
            raise ValueError("lora_modules: a mapping of name -> directory, or a list of 'name=path' strings")
        entries = dict(e.split("=", 1) for e in entries)
    if not entries:
        return {}
    if encoder:
        raise ValueError(f"lora_modules: {served_name} is an encoder; LoRA adapters are served on decoders")
    if set(quantizations) != {"none"}:
        raise ValueError("lora_modules: LoRA adapters are not supported on quantized stages (quantization: "
                         f"{sorted(set(quantizations) - {'none'})}); serve the model in {args.dtype}")
    adapters = {}
    for name, path in entries.items():
        if not name or name == served_name:
            raise ValueError(f"lora_modules: {name!r} cannot name an adapter (empty, or the model's own name)")
        adapters[name] = os.path.abspath(os.path.expanduser(path))
        rank = max((t.rank for t in check_adapter(model_dir, adapters[name], name).values()), default=0)
        if rank > args.max_lora_rank:
            raise ValueError(f"LoRA adapter {name!r} has rank {rank}, above max_lora_rank ({args.max_lora_rank})")
    return adapters


def plan_stages(model_dir: str, args: BuilderArgs) -> list[tuple[int, int, dict, object]]:
    """Block ranges of the stages, each with the `ray_actor_options` that place it.

    A fixed `num_stages` splits the blocks evenly by bytes and leaves placement to Ray. With
    `num_stages: auto` (or a `cluster` file) the planner picks the ranges and a device for each,
    from the live Ray cluster (or the file, checked against the live cluster), and every stage
    is pinned to its node; the fourth item is then its `placement.StageSpec` (else None).
    """
    import placement

    quantization = None if args.quantization == "none" else args.quantization
    spec = placement.ModelSpec.from_model_dir(model_dir, dtype=args.dtype, quantization=quantization)
    spec = spec.with_step_tokens(step_tokens(args))
    if args.num_stages != "auto" and args.cluster is None:
        return [(start, end, {}, None) for start, end in placement.split_even(spec, args.num_stages)]

    import ray

    from app.cluster import check_matches, live_nodes, stage_options

    if not ray.is_initialized():
        ray.init(address="auto")
    live = live_nodes(ray.nodes())
    if args.cluster is not None:
        described = placement.load_cluster(args.cluster)
        check_matches(described, live)
    else:
        described = placement.ClusterSpec(tuple(node for node, _ in live.values()))
    plan = placement.plan(spec, described, reserve_fraction=args.plan_reserve_fraction,
                          kv_tokens=pool_tokens(args))
    if args.num_stages != "auto" and plan.num_stages != args.num_stages:
        logger.warning("stagewise: the plan for %s has %d stages, not %d", args.cluster, plan.num_stages,
                       args.num_stages)
    pins = {name: pin for name, (_, pin) in live.items()}
    for stage in plan.stages:
        logger.info("stagewise: blocks [%d, %d) on %s (%.2f GiB of weights)", stage.start, stage.end,
                    stage.device, stage.weight_bytes / 2**30)
    return [(stage.start, stage.end, stage_options(stage, pins), stage) for stage in plan.stages]


def pool_tokens(args: BuilderArgs) -> int:
    """Tokens in each stage replica's KV block pool (what the planner reserves memory for)."""
    return placement.kv_pool_blocks(args.plan_kv_tokens, args.kv_block_size) * args.kv_block_size


def step_tokens(args: BuilderArgs) -> int:
    """The most tokens one step carries (padding included): decode rows and prompt chunks within
    the budget, or a token for each open sequence. Each stage's working memory is planned for it,
    and taken at its start."""
    return max(args.max_num_batched_tokens, args.max_batch_size)


def engine_config(model_dir: str, args: BuilderArgs) -> EngineConfig:
    from transformers import AutoConfig

    from stages.encoder import is_encoder, read_encoder_config

    config = AutoConfig.from_pretrained(model_dir)
    encoder = is_encoder(config)  # no KV cache; its longest input is its checkpoint's max_seq_length
    limit = read_encoder_config(model_dir).max_seq_length if encoder else \
        getattr(config, "max_position_embeddings", None) or 4096
    max_model_len = min(args.max_model_len or min(limit, 4096), limit)
    if pool_tokens(args) < max_model_len and not encoder:
        raise ValueError(f"plan_kv_tokens ({args.plan_kv_tokens}) must hold at least one sequence of max_model_len "
                         f"({max_model_len}) tokens: raise it, or lower max_model_len")
    return EngineConfig(max_batch_size=args.max_batch_size, max_model_len=max_model_len,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        long_prefill_token_threshold=args.long_prefill_token_threshold,
                        attention_cost_tokens=0 if encoder else attention_cost_tokens(model_dir, config),
                        num_microbatches=args.num_microbatches,
                        max_queued_requests=args.max_queued_requests, step_timeout_s=args.step_timeout_s,
                        max_step_failures=args.max_step_failures, prefix_caching=args.enable_prefix_caching,
                        max_beam_width=args.max_beam_width, max_loras=args.max_loras)


def attention_cost_tokens(model_dir: str, config) -> int:
    """Tokens of context whose attention costs a new token what its blocks' matrices cost it, in
    FLOPs: a block multiplies a token by each of its parameters (2 FLOPs each) and a query meets
    each key and value once per head (4 x heads x head_dim FLOPs). The scheduler sizes prompt
    chunks by it. 0 (chunks by tokens) for a sliding window, where attention stops growing. On
    the CPU attention does fewer FLOPs a second than the matrices, so a chunk's real cost grows
    faster than this says: chunks are sized on the safe side."""
    text = config.get_text_config()
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return 0
    spec = placement.ModelSpec.from_model_dir(model_dir, dtype="float32")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return round(sum(spec.block_params) / spec.num_layers / (2 * heads * head_dim))


def wire_limits(args: BuilderArgs, config: EngineConfig):
    """What a data-plane message may be: the builder's byte caps, rows up to the batch."""
    from app.wire import Limits

    return Limits(max_header_bytes=args.max_header_bytes, max_payload_bytes=args.max_payload_bytes,
                  max_rows=config.max_batch_size)


def api_keys(args: BuilderArgs) -> tuple[str, ...]:
    """The API keys: the `api_keys` arg and $STAGEWISE_API_KEYS (comma-separated), read here, where
    `serve run` was started: replicas do not see that shell's environment."""
    keys = list(args.api_keys or []) + os.environ.get("STAGEWISE_API_KEYS", "").split(",")
    keys = [key.strip() for key in keys if key.strip()]
    if any(len(key) < 8 for key in keys):
        raise ValueError("api_keys: every key needs at least 8 characters")
    return tuple(dict.fromkeys(keys))


def build_app(args: BuilderArgs):
    """Builds the application: `Stage0 … StageN-1` deployments and the `Ingress`.

    Args:
        args: builder arguments (see `BuilderArgs`).

    Returns:
        A bound Serve application.
    """
    from ray import serve
    from transformers import AutoConfig

    from app.deployments import DRAIN_TIMEOUT_S, StageDeployment
    from app.ingress import Ingress
    from stages.encoder import is_encoder

    if isinstance(args, dict):
        args = BuilderArgs(**args)
    model_dir, served_name = resolve_model(args)
    planned = plan_stages(model_dir, args)
    config = engine_config(model_dir, args)
    num_gpus = args.stage_num_gpus if args.stage_num_gpus is not None else _default_gpus_per_stage(len(planned))
    threads = args.stage_num_threads or os.cpu_count() or 1
    logger.info("stagewise: %s in %d stages %s", served_name, len(planned), [(s, e) for s, e, _, _ in planned])
    quantizations = args.stage_quantization or [args.quantization] * len(planned)
    if len(quantizations) != len(planned):
        raise ValueError(f"stage_quantization has {len(quantizations)} entries for {len(planned)} stages")
    encoder = is_encoder(AutoConfig.from_pretrained(model_dir))
    if encoder and set(quantizations) != {"none"}:
        raise ValueError(f"quantization: {served_name} is an encoder, served in {args.dtype}; int8 and nf4 "
                         "stages are for decoders")
    adapters = lora_adapters(args, model_dir, served_name, quantizations, encoder)
    limits = wire_limits(args, config)
    stages = []
    for index, (start, end, pin, _) in enumerate(planned):
        options = {"num_cpus": args.stage_num_cpus, "num_gpus": num_gpus, **pin,
                   "runtime_env": {"env_vars": stage_env(threads, quantizations[index])}}
        scaling = ({"autoscaling_config": args.stage_autoscaling} if args.stage_autoscaling is not None
                   else {"num_replicas": 1})
        deployment = serve.deployment(StageDeployment, name=f"Stage{index}", ray_actor_options=options,
                                      health_check_period_s=args.health_check_period_s,
                                      health_check_timeout_s=args.health_check_timeout_s,
                                      # a replica going away drains: its sequences move elsewhere
                                      graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S + 5,
                                      graceful_shutdown_wait_loop_s=0.5, **scaling)
        stages.append(deployment.bind(model_dir, index, start, end, dtype=args.dtype,
                                      quantization=quantizations[index],
                                      max_batch_size=args.max_batch_size, block_size=args.kv_block_size,
                                      num_blocks=pool_tokens(args) // args.kv_block_size,
                                      num_threads=threads, parallel_min_tokens=args.stage_parallel_min_tokens,
                                      step_tokens=step_tokens(args), limits=limits, encoder=encoder,
                                      lora_modules=adapters))
    # Serve's default of 5 ongoing requests per replica would cap the batch: the engine queues
    # (and answers 503 past max_queued_requests) itself.
    # The ingress runs where the checkpoint is (here): it reads the tokenizer, and serves the
    # tensors to stages on nodes without the files.
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress",
                               ray_actor_options={"num_cpus": 0, **_this_node_pin()},
                               # a stopping ingress looks for requests still running every 0.5 s, not 2
                               graceful_shutdown_wait_loop_s=0.5,
                               max_ongoing_requests=args.max_batch_size + args.max_queued_requests + 64)
    keys = api_keys(args)
    logger.info("stagewise: %s", f"{len(keys)} API key(s) required" if keys else "no API key required")
    from app.rehome import Placed

    placed = [Placed(f"Stage{i}", s.start, s.end, s.node, s.weight_bytes + s.kv_bytes + s.work_bytes)
              for i, (_, _, _, s) in enumerate(planned) if s is not None] or None
    return ingress.bind(stages, model_dir, served_name, config, api_keys=keys, limits=limits, placed=placed,
                        node_grace_period_s=args.node_grace_period_s, reserve_fraction=args.plan_reserve_fraction,
                        lora_modules=adapters)


def stage_env(threads: int, quantization: str) -> dict[str, str]:
    """Environment variables of a stage replica's process."""
    env = {"OMP_NUM_THREADS": str(threads),
           # A short OpenMP spin: threads still spin between the ops of a step, but an idle stage
           # stops spinning soon instead of stealing the core the next stage needs.
           "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000"),
           # Autoscaling metrics reach the controller every second, not every 10 s.
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    # glibc keeps large temporaries (bitsandbytes', a packed layer's blocks of rows while it
    # loads) unless they are mmapped. Not a decode step's activations of a float stage: mapping
    # them afresh every step cost 8% of the step (2 MiB of logits, for one).
    env["MALLOC_MMAP_THRESHOLD_"] = "131072" if quantization != "none" else str(4 * 2**20)
    # Every thread that allocates (the data plane's, the compute thread) would get a heap of its
    # own, each keeping what was freed in it: measured 40-60 MiB per stage under load beyond the
    # largest step's working memory. The threads are few and mostly in torch's kernels.
    env["MALLOC_ARENA_MAX"] = "2"
    # oneDNN (and ideep, PyTorch's wrapper of it) keep a compiled primitive for every shape a
    # packed layer has run at, 1,024 of each by default: about 2.4 MiB more for every new step
    # size on the 125M Llama, without end under load (prompts of every length). 64 of each keep
    # a steady batch's shapes and bound the rest (measured: about 20 MiB in all).
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    env["LRU_CACHE_CAPACITY"] = os.environ.get("LRU_CACHE_CAPACITY", "64")
    return env


def _this_node_pin() -> dict:
    """`ray_actor_options` that put an actor on the node running this code (by the node's name),
    or nothing outside a Ray cluster."""
    import ray

    if not ray.is_initialized():
        return {}
    from app.cluster import live_nodes

    try:
        here, nodes = ray.get_runtime_context().get_node_id(), ray.nodes()
    except Exception:  # noqa: BLE001 - not connected after all
        return {}
    for node in nodes:
        if node["NodeID"] == here:
            (pin,) = [pin for _, pin in live_nodes([node]).values()]
            return pin
    return {}


def _default_gpus_per_stage(num_stages: int) -> float:
    """One GPU per stage when the cluster has enough, a share of one when it has fewer, else 0."""
    import ray

    if not ray.is_initialized():
        return 0.0
    total = ray.cluster_resources().get("GPU", 0)
    if total <= 0:
        return 0.0
    return 1.0 if total >= num_stages else total / num_stages
