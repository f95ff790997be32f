"""The cluster a model is planned onto: nodes and the devices that can each hold a stage.

A cluster file is YAML (or JSON):

    nodes:
      - {name: big, gpus: 1, memory_gb: 80, tflops: 312}   # memory_gb and tflops per GPU
      - {name: box, gpus: 0, memory_gb: 64, tflops: 2}     # CPU-only: memory_gb is its RAM

`memory_gb` is in GiB (2**30 bytes). Each GPU of a GPU node is a device of its own; a CPU-only
node is one device. The application builder builds the same description from the live Ray
cluster with `ClusterSpec.from_dicts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

GIB = 1 << 30
_NODE_KEYS = ("name", "gpus", "memory_gb", "tflops")


@dataclass(frozen=True)
class DeviceSpec:
    """One device that can hold a stage: a GPU, or a CPU-only node's memory."""

    node: str  # the node's name
    gpu: int | None  # the GPU's index on its node; None on a CPU-only node
    memory_bytes: int
    tflops: float  # peak dense TFLOPS at the serving dtype; only ratios between devices matter

    @property
    def name(self) -> str:
        """`node:gpuN` for a GPU, `node:cpu` for a CPU-only node."""
        return f"{self.node}:cpu" if self.gpu is None else f"{self.node}:gpu{self.gpu}"


@dataclass(frozen=True)
class NodeSpec:
    """One node of a cluster, as a cluster file describes it."""

    name: str
    gpus: int  # 0: a CPU-only node
    memory_gb: float  # GiB per GPU; for a CPU-only node, its RAM
    tflops: float  # per GPU; for a CPU-only node, the node's

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a node needs a non-empty string name, got {self.name!r}")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise ValueError(f"node {self.name!r}: gpus must be an integer >= 0, got {self.gpus!r}")
        for key in ("memory_gb", "tflops"):
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ValueError(f"node {self.name!r}: {key} must be a number > 0, got {value!r}")

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        """The node's devices: one per GPU, or the node itself when it has none."""
        memory_bytes = int(self.memory_gb * GIB)
        if self.gpus == 0:
            return (DeviceSpec(self.name, None, memory_bytes, float(self.tflops)),)
        return tuple(
            DeviceSpec(self.name, gpu, memory_bytes, float(self.tflops)) for gpu in range(self.gpus)
        )


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster's nodes, kept sorted by name.

    Sorting makes a plan a function of the cluster alone, not of the order a file or Ray happens
    to list the nodes in: the same cluster always gives the same plan.
    """

    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        nodes = tuple(sorted(self.nodes, key=lambda node: node.name))
        names = [node.name for node in nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"node names must be unique, repeated: {', '.join(duplicates)}")
        object.__setattr__(self, "nodes", nodes)

    @classmethod
    def from_dicts(cls, nodes: Iterable[Mapping[str, Any]]) -> ClusterSpec:
        """A cluster from `{name, gpus, memory_gb, tflops}` mappings, one per node.

        Args:
            nodes: the node mappings; unknown or missing keys are errors.

        Returns:
            The cluster.
        """
        specs = []
        for index, node in enumerate(nodes):
            if not isinstance(node, Mapping):
                raise ValueError(f"node {index} must be a mapping, got {node!r}")
            unknown = sorted(set(node) - set(_NODE_KEYS))
            missing = [key for key in _NODE_KEYS if key not in node]
            if unknown or missing:
                raise ValueError(
                    f"node {index} ({node.get('name', '?')}): "
                    f"missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                    f"expected keys {list(_NODE_KEYS)}"
                )
            specs.append(NodeSpec(**{key: node[key] for key in _NODE_KEYS}))
        return cls(tuple(specs))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterSpec:
        """A cluster from a cluster file's content: `{"nodes": [...]}`."""
        if not isinstance(data, Mapping) or not isinstance(data.get("nodes"), list):
            raise ValueError("a cluster description needs a list under 'nodes'")
        return cls.from_dicts(data["nodes"])

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        """Every device, by node name then GPU index."""
        return tuple(device for node in self.nodes for device in node.devices)

    @property
    def memory_bytes(self) -> int:
        """Memory of all devices together."""
        return sum(device.memory_bytes for device in self.devices)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Reads a cluster file (YAML, or JSON, which is YAML too).

    Args:
        path: the file.

    Returns:
        The cluster it describes.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    try:
        return ClusterSpec.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
