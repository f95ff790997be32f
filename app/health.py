"""What `GET /health` says, and why a request cannot be served: from what the stages announce.

Every stage replica announces itself to the registry (`app.registry`) with its state:
"starting" while it loads its blocks, "failed" with the cause when the load failed (it retries),
"ready" once it serves on the data plane (with `draining` when it is going away). This module
turns those announcements into one line per stage, the health contract:

    {"status": "ok" | "unavailable",
     "engine": {"alive": bool, "restarts": int},
     "stages": [{"name": "Stage0", "state": "ready|starting|failed|missing|draining",
                 "replicas": [{"state", "node", "sequences", "error",
                               "blocks": {"used", "free", "cached", "total"} | None}, ...],
                 "node": "10.0.0.5", "error": str | None}, ...]}

200 when every stage is ready or draining, otherwise 503 with the same body.
"""

from __future__ import annotations

SERVING_STATES = ("ready", "draining")


def replica_state(announced: dict) -> str:
    """A replica's state: its announced one, "draining" for a ready replica that is going away."""
    state = announced.get("state", "ready")
    return "draining" if state == "ready" and announced.get("draining") else state


def stage_report(num_stages: int, announced: list[dict], sequences: dict[str, int] | None = None,
                 problems: dict[str, str] | None = None, blocks: dict[str, dict] | None = None) -> list[dict]:
    """One entry per stage, in pipeline order (see the module docstring).

    Args:
        num_stages: stages in the pipeline.
        announced: the registry's entries: {"id", "stage", "state", "draining", "node", "error", ...}.
        sequences: replica id -> sequences it holds (the engine's count).
        problems: stage name -> why a missing stage cannot come back (its node gone for good, no
            other node with room; see `app.rehome`).
        blocks: replica id -> its KV cache blocks used, free (cached ones included), cached (holding
            a prefix that later prompts can share) and in all (the engine's count).

    Returns:
        The stages' entries.
    """
    sequences = sequences or {}
    report = []
    for index in range(num_stages):
        mine = sorted((r for r in announced if r["stage"] == index), key=lambda r: r["id"])
        replicas = [{"state": replica_state(r), "node": r.get("node"), "sequences": sequences.get(r["id"], 0),
                     "error": r.get("error"), "blocks": (blocks or {}).get(r["id"])} for r in mine]
        states = {r["state"] for r in replicas}
        # The best state of any replica is the stage's: one ready replica serves it.
        state = next((s for s in ("ready", "draining", "starting", "failed") if s in states), "missing")
        errors = [r["error"] for r in replicas if r["state"] == "failed" and r["error"]]
        if state == "missing" and (problems or {}).get(f"Stage{index}"):
            errors = [problems[f"Stage{index}"]]
        nodes = sorted({r["node"] for r in replicas if r["node"]})
        report.append({"name": f"Stage{index}", "state": state, "replicas": replicas,
                       "node": ", ".join(nodes) or None, "error": errors[0] if errors else None})
    return report


def unavailable_reason(report: list[dict]) -> str | None:
    """Why requests cannot be served now, or None: the stage with the most telling reason (a known
    cause before a load in progress before a replica not there yet), first in pipeline order."""
    def rank(stage: dict) -> int:
        if stage["state"] == "failed":
            return 0
        if stage["state"] == "missing" and stage["error"]:
            return 1
        return 2 if stage["state"] == "starting" else 3

    down = sorted((stage for stage in report if stage["state"] not in SERVING_STATES), key=rank)
    if not down:
        return None
    stage = down[0]
    name, state = stage["name"], stage["state"]
    if state == "failed":
        return f"{name} failed to load: {stage['error']} (it retries; see /health)"
    if state == "starting":
        return f"{name} is starting: loading its blocks on {stage['node']}"
    if stage["error"]:
        return f"{name} has no replica: {stage['error']}"
    return f"{name} has no replica: Serve is starting or replacing it"


def health_body(report: list[dict], engine_alive: bool, engine_restarts: int) -> tuple[int, dict]:
    """(HTTP status, body) of `GET /health`."""
    ok = engine_alive and all(stage["state"] in SERVING_STATES for stage in report)
    body = {"status": "ok" if ok else "unavailable",
            "engine": {"alive": engine_alive, "restarts": engine_restarts}, "stages": report}
    return (200 if ok else 503), body
