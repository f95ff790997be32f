"""Starting the app with `serve run` for end-to-end tests and benchmarks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigint_default() -> None:
    """`preexec_fn` for a `serve run` child: SIGINT back to its default. A shell that starts
    pytest in the background (`cmd &`, nohup) leaves SIGINT ignored, children inherit that, and
    Python then installs no KeyboardInterrupt handler: `serve run` would ignore the SIGINT that
    stops it, and every server's teardown would wait out its 30 s before a SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# `serve run` has no option for Ray's metrics export port, but uses a Ray that is already up.
_SERVE_RUN_WITH_METRICS_PORT = """
import sys
import ray
from ray.serve.scripts import cli
ray.init(namespace="serve", _metrics_export_port=int(sys.argv[1]))
cli(["run", sys.argv[2]])
"""


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None, log=None,
                 any_status: bool = False) -> dict:
    """Waits until `url`'s `/health` answers 200 (every stage loaded; with `any_status`, until it
    answers at all); returns its body."""
    deadline, body = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{log() if log else ''}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # Serve's proxy says 404 (not JSON) until the app is up
            if e.code == 503:
                body = json.load(e)
                if any_status:
                    return body
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy in {timeout:.0f} s: {body}")


def wait_for(predicate, timeout: float, period: float = 1.0) -> float:
    """Waits until `predicate()` is true (failing the test after `timeout` s); returns the seconds it took."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, "timed out"
        time.sleep(period)
    return time.monotonic() - began


def free_port() -> int:
    """A port free now for a server that binds it later, outside the kernel's ephemeral range and Ray's
    worker ports (10002-19999). A port from the ephemeral range (what binding port 0 gives) can be taken
    by any outgoing connection before the server binds it: Serve's proxy then fails to start."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except OSError:
        low, high = 32768, 60999
    ports = [p for p in range(20000, 65536) if not low <= p <= high]
    for port in random.Random().sample(ports, min(len(ports), 200)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port outside {low}-{high}")


class ServeRun:
    """`serve run` of a generated config in a subprocess; stopped (with its Ray) on exit.

    Args:
        args: the application's builder args.
        port: HTTP port (default: a free one).
        timeout: seconds to wait until `/v1/models` answers.
        env: extra environment variables.
        metrics_export_port: where Ray's Prometheus endpoint listens (`/metrics`); default: Ray picks.
        deployments: the application's `deployments:` list (per-deployment overrides).
        healthy: wait until `/health` says every stage is loaded; False: until the ingress answers.
    """

    def __init__(self, args: dict, port: int | None = None, timeout: float = 240, env: dict | None = None,
                 metrics_export_port: int | None = None, deployments: list[dict] | None = None,
                 healthy: bool = True):
        self.args, self.port, self.timeout = args, port or free_port(), timeout
        self.healthy = healthy
        self.deployments = deployments
        self.env = env or {}
        self.metrics_export_port = metrics_export_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServeRun":
        config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": self.port},
                  "applications": [{"name": "stagewise", "route_prefix": "/", "import_path": "app:build_app",
                                    "args": self.args}]}
        if self.deployments:
            config["applications"][0]["deployments"] = self.deployments
        self._dir = tempfile.mkdtemp(prefix="stagewise-serve-")
        path = os.path.join(self._dir, "serve_config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = os.path.join(self._dir, "serve.log")
        env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", **self.env)
        self._log = open(self.log_path, "w")
        command = [sys.executable, "-m", "ray.serve.scripts", "run", path]
        if self.metrics_export_port is not None:
            command = [sys.executable, "-c", _SERVE_RUN_WITH_METRICS_PORT, str(self.metrics_export_port), path]
        self.proc = subprocess.Popen(command, cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=sigint_default)
        try:
            wait_healthy(self.url, self.timeout, self.proc, lambda: self.log()[-4000:], any_status=not self.healthy)
        except TimeoutError as exc:
            self.__exit__(None, None, None)
            raise TimeoutError(f"serve run not ready: {exc}\n{self.log()[-4000:]}") from None
        self.model = self.get("/v1/models")["data"][0]["id"]
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        self._log.close()

    def get(self, path: str, timeout: float = 30) -> dict:
        """The JSON body of a GET, whatever its status (`/health` answers 503 with a body)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def replicas_per_stage(self) -> list[int]:
        """Ready (not draining) replicas of each stage, as the ingress sees them (`/health`)."""
        return [sum(r["state"] == "ready" for r in stage["replicas"]) for stage in self.get("/health")["stages"]]

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
        return post_json(self.url + path, body, timeout)


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON body) of a POST, errors included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
