"""Memory-aware placement of a model's block ranges on a heterogeneous cluster.

Pure Python: importing it loads neither Ray nor torch. Only `ModelSpec.from_config` (and
`from_model_dir`) import torch and transformers, to count a model's bytes on the meta device.

    spec = ModelSpec.from_model_dir("path/to/checkpoint", dtype="float16", quantization="int8")
    result = plan(spec, load_cluster("cluster.yaml"))
    for stage in result.stages:
        print(stage.start, stage.end, stage.node, stage.gpu)
"""

from placement.cluster import GIB, ClusterSpec, DeviceSpec, NodeSpec, load_cluster
from placement.model_spec import ModelSpec, ModelTallies, PartTally, kv_pool_blocks
from placement.partition import split_even
from placement.planner import (
    DEFAULT_KV_TOKENS,
    DEFAULT_RESERVE_FRACTION,
    InfeasiblePlanError,
    Plan,
    StageSpec,
    plan,
)

__all__ = [
    "kv_pool_blocks",
    "DEFAULT_KV_TOKENS",
    "DEFAULT_RESERVE_FRACTION",
    "GIB",
    "ClusterSpec",
    "DeviceSpec",
    "InfeasiblePlanError",
    "ModelSpec",
    "ModelTallies",
    "NodeSpec",
    "PartTally",
    "Plan",
    "StageSpec",
    "load_cluster",
    "plan",
    "split_even",
]
