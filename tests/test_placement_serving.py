"""num_stages: auto on a 3-node cluster in one machine: stages run where the plan says."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving import free_port, wait_healthy

MIB = 2**20
ARGS = {"num_stages": "auto", "plan_kv_tokens": 128, "max_model_len": 128, "max_batch_size": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.checkpoints import build_checkpoint

    # 12 blocks of about 2.3 MiB each (hidden 256, MLP 512): too big for any one node below.
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("planned") / "llama-mid"), hidden_size=256,
                            intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                            num_key_value_heads=2)


@pytest.fixture(scope="module")
def cluster(model_dir):
    import ray
    from ray.cluster_utils import Cluster

    from app.builder import BuilderArgs, step_tokens
    from placement import ModelSpec

    # Each node has room for 12 or 16 MiB of weights and KV cache besides a stage's working
    # memory (the planner keeps 5% of a node free).
    spec = ModelSpec.from_model_dir(model_dir, dtype="float32").with_step_tokens(step_tokens(BuilderArgs(**ARGS)))
    work = max(spec.stage_work_bytes(i, i + 1) for i in range(spec.num_layers)) / 0.95
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "memory": int(12 * MIB + work), "resources": {"node_a": 1, "tflops": 1},
        "include_dashboard": True})
    cluster.add_node(num_cpus=1, memory=int(16 * MIB + work), resources={"node_b": 1, "tflops": 2})
    cluster.add_node(num_cpus=1, memory=int(12 * MIB + work), resources={"node_c": 1, "tflops": 1})
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}})
    yield cluster
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_auto_places_stages_on_the_planned_nodes(cluster, model_dir, tmp_path):
    from ray import serve
    from ray.util.state import list_actors

    from app.builder import BuilderArgs, build_app, plan_stages
    import ray

    args = {"model": model_dir, **ARGS}
    planned = plan_stages(model_dir, BuilderArgs(**args))
    assert len(planned) >= 2  # no node holds the model
    assert planned[0][0] == 0 and planned[-1][1] == 12
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="stagewise", route_prefix="/")
    wait_healthy(f"http://127.0.0.1:{port}", timeout=120)

    # Pinned by name (here each node's own custom resource), which a restarted node keeps.
    node_of = {name: node["NodeID"] for node in ray.nodes() if node["Alive"]
               for name in ("node_a", "node_b", "node_c") if name in node["Resources"]}
    for index, (start, end, options, _) in enumerate(planned):
        info = serve.get_deployment_handle(f"Stage{index}", app_name="stagewise").info.remote().result()
        assert (info["start"], info["end"]) == (start, end)
        (name,) = options["resources"]
        actors = list_actors(filters=[("class_name", "=", f"ServeReplica:stagewise:Stage{index}"),
                                      ("state", "=", "ALIVE")])
        assert [a.node_id for a in actors] == [node_of[name]]
    assert len({name for _, _, o, _ in planned for name in o["resources"]}) == len(planned)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("the quick brown fox").input_ids
    out = AutoModelForCausalLM.from_pretrained(model_dir).generate(torch.tensor([ids]), max_new_tokens=16,
                                                                   do_sample=False)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    body = json.dumps({"model": "llama-mid", "prompt": "the quick brown fox", "max_tokens": 16,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    assert json.load(urllib.request.urlopen(request, timeout=120))["choices"][0]["text"] == expected

    # A cluster file that names a node the live cluster lacks is refused, clearly.
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "node_z", "gpus": 0, "memory_gb": 1, "tflops": 1}]}))
    with pytest.raises(ValueError, match="node_z"):
        plan_stages(model_dir, BuilderArgs(**dict(args, cluster=str(path))))
