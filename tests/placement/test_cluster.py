"""Cluster files: nodes, devices, GiB, validation."""

import pytest

from placement import GIB, ClusterSpec, DeviceSpec, load_cluster

CLUSTER_YAML = """
nodes:
  - {name: workstation, gpus: 2, memory_gb: 24, tflops: 71}
  - {name: box, gpus: 0, memory_gb: 64.5, tflops: 1.5}
  - name: a100
    gpus: 1
    memory_gb: 80
    tflops: 312
"""


def test_load_cluster_devices_sorted_by_node_name(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER_YAML)
    cluster = load_cluster(path)
    assert [node.name for node in cluster.nodes] == ["a100", "box", "workstation"]
    assert cluster.devices == (
        DeviceSpec("a100", 0, 80 * GIB, 312.0),
        DeviceSpec("box", None, int(64.5 * GIB), 1.5),  # a CPU node: one device, its RAM
        DeviceSpec("workstation", 0, 24 * GIB, 71.0),  # memory and tflops are per GPU
        DeviceSpec("workstation", 1, 24 * GIB, 71.0),
    )
    assert [device.name for device in cluster.devices] == [
        "a100:gpu0", "box:cpu", "workstation:gpu0", "workstation:gpu1"
    ]  # fmt: skip
    assert cluster.memory_bytes == (80 + 64.5 + 48) * GIB


def test_listing_order_does_not_matter():
    nodes = [
        {"name": "b", "gpus": 1, "memory_gb": 8, "tflops": 10},
        {"name": "a", "gpus": 0, "memory_gb": 16, "tflops": 1},
    ]
    assert ClusterSpec.from_dicts(nodes) == ClusterSpec.from_dicts(nodes[::-1])


@pytest.mark.parametrize(
    "nodes, message",
    [
        ([{"name": "a", "gpus": 1, "memory_gb": 8}], "missing \\['tflops'\\]"),
        ([{"name": "a", "gpus": 1, "memory_gb": 8, "tflops": 1, "ram": 3}], "unknown \\['ram'\\]"),
        ([{"name": "a", "gpus": -1, "memory_gb": 8, "tflops": 1}], "gpus"),
        ([{"name": "a", "gpus": True, "memory_gb": 8, "tflops": 1}], "gpus"),
        ([{"name": "a", "gpus": 1, "memory_gb": 0, "tflops": 1}], "memory_gb"),
        ([{"name": "a", "gpus": 1, "memory_gb": 8, "tflops": "fast"}], "tflops"),
        ([{"name": "", "gpus": 1, "memory_gb": 8, "tflops": 1}], "name"),
        ([{"name": "a", "gpus": 1, "memory_gb": 8, "tflops": 1}] * 2, "unique"),
        (["a"], "mapping"),
    ],
)
def test_invalid_nodes_are_refused(nodes, message):
    with pytest.raises(ValueError, match=message):
        ClusterSpec.from_dicts(nodes)


def test_invalid_files_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nodes: {name: a}\n")
    with pytest.raises(ValueError, match="bad.yaml.*nodes"):
        load_cluster(path)
    path.write_text("nodes: [\n")
    with pytest.raises(ValueError, match="YAML"):
        load_cluster(path)
