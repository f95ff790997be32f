"""Stages are pinned to their node by its name, which a restart keeps (not by its node id)."""

from __future__ import annotations

from app.cluster import NAME_LABEL, NODE_ID_LABEL, live_nodes

GIB = 2**30


def node(node_id: str, labels: dict | None = None, **resources) -> dict:
    return {"NodeID": node_id, "Alive": True, "Labels": labels or {},
            "Resources": {"CPU": 2.0, "memory": 4.0 * GIB, **resources}}


def test_pinned_by_label_then_custom_resource_then_node_id():
    live = live_nodes([node("id-1", {NAME_LABEL: "host-a", "ray.io/node-id": "id-1"}),
                       node("id-2", node_b=1.0), node("id-3")])
    assert live["host-a"][1] == {"label_selector": {NAME_LABEL: "host-a"}}
    assert live["node_b"][1] == {"resources": {"node_b": 0.001}}
    assert live["id-3"][1] == {"label_selector": {NODE_ID_LABEL: "id-3"}}
    assert live["host-a"][0].memory_gb == 4.0


def test_a_restarted_node_keeps_its_pin_and_a_shared_name_falls_back_to_ids():
    before = live_nodes([node("old-id", {NAME_LABEL: "host-b"})])
    after = live_nodes([node("new-id", {NAME_LABEL: "host-b"})])
    assert before["host-b"][1] == after["host-b"][1]  # the replacement replica finds the node again
    twins = live_nodes([node("id-1", {NAME_LABEL: "twin"}), node("id-2", {NAME_LABEL: "twin"})])
    assert sorted(pin["label_selector"][NODE_ID_LABEL] for _, pin in twins.values()) == ["id-1", "id-2"]


def test_a_stage_moves_to_the_live_node_with_the_most_room_that_holds_it():
    from app.rehome import Placed, choose_node

    stage = Placed("Stage1", 6, 12, "b", need_bytes=300)
    assert choose_node(stage, {"a": 1000, "b": 5000, "c": 600}, {"a": 800, "b": 300}) == "c"  # never b itself
    assert choose_node(stage, {"a": 1000, "c": 2000}, {"a": 0, "c": 1800}) == "a"
    assert choose_node(stage, {"a": 1000}, {"a": 900}) is None
