"""Where the stage replicas are: each announces its data-plane address here, the ingress reads it.

Serve knows a deployment's replicas but routes every call to one of them; the ingress must
reach all of them, and learn at once when one drains. So the ingress owns a small named Ray
actor (it dies with the ingress, and a new ingress makes a new one), every stage replica
announces itself to it every second (again after a new ingress appears), and says when it is
draining. An entry not renewed for `ttl_s` is dropped; a replica whose process dies is noticed
sooner by the ingress's watch connection.

The registry also hands out, over Ray's own authenticated channels only, what the data plane
needs to keep strangers out (see `app.wire`): the application's secret, which the ingress made,
and the addresses of the application's processes, which a step's route may name.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("ray.serve")

ANNOUNCE_PERIOD_S = 1.0


def registry_name(app_name: str) -> str:
    return f"stagewise-registry:{app_name}"


class Registry:
    """The stage replicas of one application (run as a Ray actor).

    Args:
        secret: the application's data-plane secret (made by the ingress).
        reply_address: where the ingress receives results.
        ttl_s: seconds an announcement stays valid.
    """

    def __init__(self, secret: bytes, reply_address: str, ttl_s: float = 10.0):
        self.secret, self.reply_address = secret, reply_address
        self.ttl_s = ttl_s
        self._replicas: dict[str, tuple[float, dict]] = {}

    def announce(self, replica: dict, secret: bytes | None = None) -> dict:
        """`replica`: {"id", "stage", "start", "end", "node", "state", "error", "address", "num_slots",
        "draining"}; `state` is "starting", "failed" (with `error`) or "ready" (with `address`).

        `secret`: the one the replica knows. Until it announces with this application's, it is not
        ready to anyone and its address is not given out: a peer would reach it before it could
        answer the handshake (the first announcement, or the first to a new ingress's registry).

        Returns:
            {"secret", "addresses"}: the data plane's secret and the application's addresses.
        """
        if secret != self.secret:
            replica = {**replica, "address": None,
                       "state": "starting" if replica.get("state") == "ready" else replica.get("state")}
        self._replicas[replica["id"]] = (time.monotonic(), replica)
        return {"secret": self.secret, "addresses": self.addresses()}

    def addresses(self) -> list[str]:
        """The data-plane addresses of the application's processes: replicas and the ingress."""
        return [r["address"] for r in self.replicas() if r.get("address")] + [self.reply_address]

    def withdraw(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def replicas(self) -> list[dict]:
        now = time.monotonic()
        self._replicas = {k: v for k, v in self._replicas.items() if now - v[0] <= self.ttl_s}
        return [replica for _, replica in self._replicas.values()]


class Announcer:
    """Announces one stage replica to its application's registry, from a thread, until closed.

    Args:
        app_name: the Serve application (names the registry).
        replica: what to announce (see `Registry.announce`).
    """

    def __init__(self, app_name: str, replica: dict):
        self.name = registry_name(app_name)
        self.replica = dict(replica)
        self.secret: bytes | None = None  # from the registry: the data plane's, None until heard
        self.addresses: frozenset[str] = frozenset()
        self._registry = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stagewise-announce")
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.announce()
            if self._stop.wait(ANNOUNCE_PERIOD_S):
                return

    def announce(self) -> bool:
        """Announces now; False if there is no registry (no ingress) to announce to."""
        import ray

        try:
            if self._registry is None:
                self._registry = ray.get_actor(self.name)
            heard = ray.get(self._registry.announce.remote(self.replica, self.secret), timeout=5)
            if heard["secret"] != self.secret:  # the first, or a new ingress's: now say we know it
                self.secret = heard["secret"]
                heard = ray.get(self._registry.announce.remote(self.replica, self.secret), timeout=5)
            self.addresses = frozenset(heard["addresses"])
            return True
        except Exception:  # noqa: BLE001 - no ingress yet, or it is being replaced: look it up again
            self._registry = None
            return False

    def update(self, **fields) -> bool:
        """Changes what is announced, and announces it now."""
        self.replica = {**self.replica, **fields}
        return self.announce()

    def known(self, addresses) -> bool:
        """Whether every address is one of the application's; asks the registry again before
        saying no (a replica that has just started may be newer than the last announcement)."""
        if set(addresses) <= self.addresses:
            return True
        return self.announce() and set(addresses) <= self.addresses

    def drain(self) -> bool:
        """Says that this replica is draining; False if no ingress heard it."""
        return self.update(draining=True)

    def close(self) -> None:
        self._stop.set()
        registry = self._registry
        if registry is not None:
            try:
                registry.withdraw.remote(self.replica["id"])
            except Exception:  # noqa: BLE001 - the ingress is gone too
                pass
