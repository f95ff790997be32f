"""A node gone for good: its planned stages move, with the same block ranges, to nodes that hold them.

A planned stage is pinned to its node by name (`app.cluster`), so that a node that restarts takes
its stages back. One that does not come back within `grace_s` leaves its stages without a replica
for good; `Rehomer` then picks, for each, another live node with the memory for the range (its
weights and KV cache, as the planner counts them, beside what that node already holds) and
redeploys just that stage deployment pinned there: through Serve's declarative config, as `serve
deploy` does, overriding the deployment's `ray_actor_options`, so the other stages and the ingress
keep serving and the open streams replay onto the new replica. Where no node can hold a range,
`problem()` says which node and stages are missing and how much memory is short (`/health` and
every request's 503 carry it).

Unpinned stages (`num_stages: N`) need none of this: Ray already starts their replacements
wherever there is room.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("ray.serve")

GIB = 2**30


@dataclass(frozen=True)
class Placed:
    """A planned stage: its deployment's name, block range, node and the memory it needs there."""

    name: str
    start: int
    end: int
    node: str
    need_bytes: int


def choose_node(stage: Placed, capacities: dict[str, int], holding: dict[str, int]) -> str | None:
    """The live node with the most memory left that holds the stage, or None.

    Args:
        stage: the stage to move.
        capacities: node name -> bytes its stages may use.
        holding: node name -> bytes the stages already there need.
    """
    left = {node: capacity - holding.get(node, 0) for node, capacity in capacities.items() if node != stage.node}
    fitting = sorted((free, node) for node, free in left.items() if free >= stage.need_bytes)
    return fitting[-1][1] if fitting else None


class Rehomer:
    """Watches the planned stages and moves those of a node gone for good (see the module docstring).

    Args:
        app_name: the Serve application.
        stages: the planned stages, in pipeline order.
        grace_s: how long a node may be gone before its stages move.
        reserve_fraction: the share of a node's memory the planner keeps free.
    """

    def __init__(self, app_name: str, stages: list[Placed], grace_s: float, reserve_fraction: float):
        self.app_name, self.grace_s, self.reserve_fraction = app_name, grace_s, reserve_fraction
        self.stages = {stage.name: stage for stage in stages}
        self._missing_since: dict[str, float] = {}
        self._problems: dict[str, str] = {}

    def problem(self, name: str) -> str | None:
        """Why stage `name` has nowhere to go, if it has not."""
        return self._problems.get(name)

    def check(self, report: list[dict]) -> None:
        """Called with the stages' health report every so often; moves what must move."""
        import ray

        from app.cluster import live_nodes

        now = time.monotonic()
        live = live_nodes(ray.nodes())
        for entry in report:
            stage = self.stages.get(entry["name"])
            if stage is None or entry["state"] != "missing" or stage.node in live:
                self._missing_since.pop(entry["name"], None)
                self._problems.pop(entry["name"], None)
                continue
            since = self._missing_since.setdefault(stage.name, now)
            if now - since >= self.grace_s:
                self._move(stage, live, now - since)

    def _move(self, stage: Placed, live: dict, gone_s: float) -> None:
        capacities = {name: int(spec.memory_gb * GIB * (1 - self.reserve_fraction)) for name, (spec, _) in live.items()}
        holding: dict[str, int] = {}
        for other in self.stages.values():
            holding[other.node] = holding.get(other.node, 0) + other.need_bytes
        target = choose_node(stage, capacities, holding)
        if target is None:
            best = max((capacities[n] - holding.get(n, 0) for n in capacities), default=0)
            message = (f"{stage.name} (blocks [{stage.start}, {stage.end}), {stage.need_bytes / GIB:.2f} GiB) has no "
                       f"node: {stage.node} is gone and the most any other node has free is {best / GIB:.2f} GiB, "
                       f"{(stage.need_bytes - best) / GIB:.2f} GiB short")
            if self._problems.get(stage.name) != message:
                logger.warning("stagewise: %s", message)
            self._problems[stage.name] = message
            return
        try:
            redeploy_pinned(self.app_name, stage.name, live[target][1])
        except Exception as exc:  # noqa: BLE001 - try again at the next check
            logger.warning("stagewise: cannot move %s to %s: %s", stage.name, target, exc)
            return
        logger.info("stagewise: node %s gone for %.0f s: %s (blocks [%d, %d)) moves to %s", stage.node, gone_s,
                    stage.name, stage.start, stage.end, target)
        self.stages[stage.name] = Placed(stage.name, stage.start, stage.end, target, stage.need_bytes)
        self._missing_since.pop(stage.name, None)
        self._problems.pop(stage.name, None)


def redeploy_pinned(app_name: str, deployment: str, pin: dict) -> None:
    """Redeploys one deployment of a declaratively deployed application with a new node pin.

    Serve keeps every other deployment of the application as it is: only this one's
    `ray_actor_options` change (the application's code version does not).
    """
    from ray.serve.context import _get_global_client  # what `serve deploy` uses
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details()
    apps = details["applications"]
    if apps.get(app_name, {}).get("deployed_app_config") is None:
        raise RuntimeError(f"application {app_name!r} was not deployed from a config (serve run/deploy FILE)")
    options = dict(apps[app_name]["deployments"][deployment]["deployment_config"]["ray_actor_options"])
    for key in ("label_selector", "resources"):
        options.pop(key, None)
    options.update(pin)
    configs = []
    for name, app in apps.items():
        config = dict(app["deployed_app_config"])
        if name == app_name:
            overrides = [d for d in config.get("deployments") or [] if d["name"] != deployment]
            previous = next((d for d in config.get("deployments") or [] if d["name"] == deployment), {})
            config["deployments"] = overrides + [{**previous, "name": deployment, "ray_actor_options": options}]
        configs.append(config)
    client.deploy_apps(ServeDeploySchema(proxy_location=details.get("proxy_location") or "EveryNode",
                                         http_options=details.get("http_options") or {}, applications=configs))
