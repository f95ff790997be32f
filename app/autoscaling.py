"""Per-stage autoscaling: Serve's `autoscaling_config.policy` for the stage deployments.

Steps reach a stage over the data plane, not through Serve, so Serve's own measure (requests
ongoing at the replica) is always 0. Each stage replica reports instead, through
`record_autoscaling_stats`, its *ongoing steps*: the time-average number of steps it was
computing or holding queued (Little's law: steps per second x seconds from arrival to done).
A replica busy half the time with nothing queued reports 0.5; one always busy with a step
always waiting reports 2. The stage with the most compute per step reports the most, so it is
the one that scales.
"""

from __future__ import annotations

import math

DEFAULT_STAGE_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "upscale_delay_s": 5.0,
    "downscale_delay_s": 30.0,
    "look_back_period_s": 12.0,
    "policy": {"policy_function": "app.autoscaling:StagePolicy", "policy_kwargs": {"target_ongoing_steps": 0.5}},
}


class StagePolicy:
    """Replicas enough that each has `target_ongoing_steps` on average.

    Serve applies `min_replicas`/`max_replicas`, the delays and the scaling factors to the
    number returned.

    Args:
        target_ongoing_steps: ongoing steps per replica to aim at.
    """

    def __init__(self, target_ongoing_steps: float = 0.5):
        if target_ongoing_steps <= 0:
            raise ValueError("target_ongoing_steps must be > 0")
        self.target = target_ongoing_steps

    def __call__(self, ctx) -> tuple[int, dict]:
        ongoing = (ctx.aggregated_metrics or {}).get("ongoing_steps") or {}
        if not ongoing:  # no report yet: keep what there is
            return ctx.target_num_replicas, ctx.policy_state
        total = sum(ongoing.values())
        desired = math.ceil(total / self.target - 1e-9)
        return max(desired, 1 if ctx.current_num_replicas else 0), ctx.policy_state
