"""The live Ray cluster as the planner sees it, and the options that pin a stage to its node.

Each alive node becomes a `placement.NodeSpec`: its GPUs, its memory (Ray's `memory` resource
for a CPU node; per GPU, the `gpu_memory_gb` custom resource or label), and its speed (the
`tflops` custom resource or label; defaults below). A stage is pinned to its node by the node's
name, which survives a restart (a node id does not: a node that comes back under the same name
takes its stages back): the `stagewise/name` label (`ray start --labels stagewise/name=gpu-box`),
else the node's own custom resource (`--resources '{"gpu-box": 1}'`). Only a node with neither
is pinned by Ray's `ray.io/node-id` label, which a restart changes.
"""

from __future__ import annotations

import logging

from placement import GIB, ClusterSpec, NodeSpec

logger = logging.getLogger("ray.serve")

NODE_ID_LABEL = "ray.io/node-id"
NAME_LABEL = "stagewise/name"
# A stage asks this much of its node's own custom resource: any number of stages fit.
PIN_AMOUNT = 0.001
# Used when a node does not say how fast it is: a CPU node and a mid-range GPU.
DEFAULT_CPU_TFLOPS = 1.0
DEFAULT_GPU_TFLOPS = 50.0
DEFAULT_GPU_MEMORY_GB = 16.0
_STANDARD = ("CPU", "GPU", "memory", "object_store_memory", "tflops", "gpu_memory_gb")


def _node_name(node: dict) -> str:
    """A readable, stable name: the `stagewise/name` label, else the node's own custom resource
    (e.g. `node_a: 1`), else its node id."""
    labels = node.get("Labels") or {}
    if NAME_LABEL in labels:
        return labels[NAME_LABEL]
    custom = sorted(k for k in node["Resources"] if k not in _STANDARD and ":" not in k)
    return custom[0] if custom else node["NodeID"][:12]


def _pin(node: dict, name: str, unique: bool) -> dict:
    """`ray_actor_options` that put an actor on this node, by its name when the name is unique."""
    labels = node.get("Labels") or {}
    if unique and labels.get(NAME_LABEL) == name:
        return {"label_selector": {NAME_LABEL: name}}
    if unique and name in node["Resources"]:
        return {"resources": {name: PIN_AMOUNT}}
    return {"label_selector": {NODE_ID_LABEL: node["NodeID"]}}


def _number(node: dict, key: str) -> float | None:
    if key in node["Resources"]:
        return float(node["Resources"][key])
    label = (node.get("Labels") or {}).get(key)
    return float(label) if label is not None else None


def live_nodes(nodes: list[dict]) -> dict[str, tuple[NodeSpec, dict]]:
    """Planner nodes of a live cluster.

    Args:
        nodes: `ray.nodes()`.

    Returns:
        name -> (NodeSpec, the `ray_actor_options` that pin an actor to it), for every alive node.
    """
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: n["NodeID"])
    names = [_node_name(node) for node in alive]
    out = {}
    for node in alive:
        gpus = int(node["Resources"].get("GPU", 0))
        if gpus:
            memory_gb = _number(node, "gpu_memory_gb") or DEFAULT_GPU_MEMORY_GB
            tflops = _number(node, "tflops") or DEFAULT_GPU_TFLOPS
        else:
            memory_gb = node["Resources"].get("memory", 0) / GIB
            tflops = _number(node, "tflops") or DEFAULT_CPU_TFLOPS
        name = _node_name(node)
        pin = _pin(node, name, unique=names.count(name) == 1)
        if name in out:
            name = f"{name}-{node['NodeID'][:8]}"
        out[name] = (NodeSpec(name=name, gpus=gpus, memory_gb=memory_gb, tflops=tflops), pin)
    return out


def check_matches(described: ClusterSpec, live: dict[str, tuple[NodeSpec, dict]]) -> None:
    """Raises ValueError naming every node of the cluster file that the live cluster lacks."""
    problems = []
    for node in described.nodes:
        if node.name not in live:
            problems.append(f"node {node.name!r} is not in the live cluster (it has {sorted(live)})")
        elif live[node.name][0].gpus < node.gpus:
            problems.append(f"node {node.name!r} has {live[node.name][0].gpus} GPUs, the file says {node.gpus}")
    if problems:
        raise ValueError("cluster file does not match the live cluster: " + "; ".join(problems))


def stage_options(stage, pins: dict[str, dict]) -> dict:
    """`ray_actor_options` that put a planned stage on its node (and GPU)."""
    return {"num_gpus": 1 if stage.gpu is not None else 0, **pins[stage.node]}
