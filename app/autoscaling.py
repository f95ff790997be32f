"""Per-stage autoscaling: Serve's `autoscaling_config.policy` for the stage deployments.

Steps reach a stage over the data plane, not through Serve, so Serve's own measure (requests
ongoing at the replica) is always 0. Each stage replica reports instead, through
`record_autoscaling_stats`, what really queues:

- `queued_steps`: the time-average number of steps waiting at it for the one it computes
  (Little's law: steps per second x seconds from arrival to the start of their compute). Steps
  queue at a stage that is slower than the others when several are in flight (micro-batches,
  or the routes through another stage's replicas), so that stage scales on its own.
  How busy a replica is says nothing here: the engine steps every route for as long as any
  sequence runs on it, so under the lightest steady load each replica computes most of the
  time, and two replicas at 60% each would hold the stage at 2 replicas for good. Decoding
  more sequences in one step costs little more than one, so the stage needs more replicas
  only when steps wait or sequences do.
- `slot_demand`: the sequences it holds plus its share of those waiting at the ingress for a
  KV cache slot, over its slots. Above 1, requests wait: more replicas hold more sequences.
"""

from __future__ import annotations

import math

DEFAULT_STAGE_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "upscale_delay_s": 5.0,
    "downscale_delay_s": 30.0,
    "look_back_period_s": 12.0,
    "policy": {"policy_function": "app.autoscaling:StagePolicy",
               "policy_kwargs": {"target_queued_steps": 1.0, "target_slot_demand": 1.0}},
}


class StagePolicy:
    """Replicas enough that each has at most `target_queued_steps` and `target_slot_demand`.

    Serve applies `min_replicas`/`max_replicas`, the delays and the scaling factors to the
    number returned, and averages the metrics over `look_back_period_s`.

    Args:
        target_queued_steps: steps waiting per replica to aim at (1: scale when, on average, a
            step always waits).
        target_slot_demand: sequences per KV cache slot a replica should be asked for (1: scale
            when sequences wait for a slot).
    """

    def __init__(self, target_queued_steps: float = 1.0, target_slot_demand: float = 1.0):
        if target_queued_steps <= 0 or target_slot_demand <= 0:
            raise ValueError("the targets must be > 0")
        self.targets = {"queued_steps": target_queued_steps, "slot_demand": target_slot_demand}

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        if not any(metrics.get(name) for name in self.targets):  # no report yet: keep what there is
            return ctx.target_num_replicas, ctx.policy_state
        desired = 1
        for name, target in self.targets.items():
            total = sum((metrics.get(name) or {}).values())
            desired = max(desired, math.ceil(total / target - 1e-9))
        return desired, ctx.policy_state
