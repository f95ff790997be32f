"""Hosts of their own on this machine: Ray nodes in separate network and mount namespaces.

Each host is a network namespace (`ip netns`) joined by a veth pair to one bridge, with its own
IP, and a mount namespace (`unshare -m`) with tmpfs over `/tmp/ray`, over the home directory's
`.ray` (where the cluster's auth token is copied in) and `.cache` (the model caches: stagewise's,
Hugging Face's): it shares no address, no Ray session and no cached file with the others. (Not
over the whole home: the Python that runs Ray may live there, as pyenv's does.) On each, `ray start` runs in the foreground (`--block`), so that
killing a host is killing every process in its namespace. A driver (`serve run`, a test's
client) is entered into the head's namespaces with `nsenter`. Traffic stays on the bridge.

Needs root and `ip netns`; `available()` says why not where they are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tests.serving import REPO, sigint_default

SUBNET = "10.213.7"  # the bridge is .1, hosts .11 onwards; a range nothing else here uses
BRIDGE = "swbr0"
GCS_PORT = 6379
TOKEN = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def available() -> str | None:
    """Why these hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "separate hosts need root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"separate hosts need `{tool}` (iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "add", "sw-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` fails here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "sw-probe"], capture_output=True)
    return None


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str
    index: int
    head: bool
    memory_bytes: int
    num_cpus: float
    labels: dict
    proc: subprocess.Popen | None = None

    @property
    def netns(self) -> str:
        return f"sw-{self.name}"

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{11 + self.index}"


class Hosts:
    """Ray nodes as separate hosts. Use as a context manager; everything is removed on exit.

    Args:
        env: extra environment for every host's Ray processes (and so its replicas).
        private: more directories each host gets its own empty tmpfs over (e.g. where a
            checkpoint is put on one host only, see `copy_into`; an installed package to hide).
    """

    def __init__(self, env: dict | None = None, private: tuple[str, ...] = ()):
        self.hosts: dict[str, Host] = {}
        self.env = env or {}
        self.private = private
        self.dir = tempfile.mkdtemp(prefix="stagewise-hosts-")

    def __enter__(self) -> "Hosts":
        reason = available()
        if reason is not None:
            raise RuntimeError(reason)
        if not os.path.exists(TOKEN):
            _run(sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate")
        shutil.copy(TOKEN, os.path.join(self.dir, "auth_token"))
        _run("ip", "link", "del", BRIDGE, check=False)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        return self

    @property
    def head(self) -> Host:
        return next(host for host in self.hosts.values() if host.head)

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    def add(self, name: str, *, memory_bytes: int, num_cpus: float = 1, head: bool = False,
            labels: dict | None = None) -> Host:
        """Makes a host and starts its Ray node (the head first); returns once it has joined."""
        host = Host(name, len(self.hosts), head, memory_bytes, num_cpus, {"stagewise/name": name, **(labels or {})})
        self.hosts[name] = host
        _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "netns", "add", host.netns)
        outside, inside = f"swv{host.index}", f"swv{host.index}n"
        _run("ip", "link", "del", outside, check=False)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", outside, "master", BRIDGE)
        _run("ip", "link", "set", outside, "up")
        _run("ip", "link", "set", inside, "netns", host.netns)
        for command in (["ip", "addr", "add", f"{host.ip}/24", "dev", inside], ["ip", "link", "set", inside, "up"],
                        ["ip", "link", "set", "lo", "up"]):
            _run("ip", "netns", "exec", host.netns, *command)
        self.start(name)
        return host

    def start(self, name: str, timeout: float = 120) -> None:
        """Starts (again) the Ray node of host `name`, with fresh private directories."""
        host = self.hosts[name]
        home = os.path.expanduser("~")
        labels = ",".join(f"{k}={v}" for k, v in host.labels.items())
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--node-ip-address={host.ip}",
               f"--num-cpus={host.num_cpus}", f"--memory={host.memory_bytes}", f"--labels={labels}",
               "--disable-usage-stats"]
        ray += ([f"--port={GCS_PORT}", "--head", "--include-dashboard=true", "--dashboard-host=0.0.0.0"]
                if host.head else [f"--address={self.address}"])
        # Private /tmp/ray, ~/.ray and ~/.cache; the cluster's token copied into the new ~/.ray.
        mounts = "".join(f"mount -t tmpfs tmpfs {path} && " for path in self.private)
        script = (f"{mounts}mount -t tmpfs tmpfs /tmp/ray && mount -t tmpfs tmpfs {home}/.ray && "
                  f"mount -t tmpfs tmpfs {home}/.cache && cp {self.dir}/auth_token {home}/.ray/auth_token && "
                  f"cd {REPO} && exec {' '.join(ray)}")
        for path in ("/tmp/ray", f"{home}/.ray", f"{home}/.cache", *self.private):
            os.makedirs(path, exist_ok=True)
        env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONPATH=REPO, HF_HUB_OFFLINE="1", **self.env)
        log = open(os.path.join(self.dir, f"{name}.log"), "a")
        host.proc = subprocess.Popen(["ip", "netns", "exec", host.netns, "unshare", "-m", "--propagation", "private",
                                      "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.wait_for_node(name, timeout)

    def wait_for_node(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hosts[name].proc.poll() is not None:
                raise RuntimeError(f"host {name}'s ray start exited:\n{self.log(name)[-3000:]}")
            if self.head.proc is not None and name in self.alive_names():
                return
            time.sleep(1)
        raise TimeoutError(f"host {name} did not join in {timeout:.0f} s:\n{self.log(name)[-3000:]}")

    def alive_names(self) -> set[str]:
        """Names of the nodes the cluster sees alive (asked from inside the head)."""
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps([n['Labels'].get('stagewise/name') for n in ray.nodes() if n['Alive']]))")
        out = self.exec([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        try:
            return set(json.loads(out.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return set()

    def log(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.log")) as f:
            return f.read()

    def driver_command(self, command: list[str]) -> list[str]:
        """`command` entered into the head's network and mount namespaces."""
        return ["nsenter", "-t", str(self.head.proc.pid), "-m", "-n", *command]

    def driver_env(self) -> dict:
        return dict(os.environ, RAY_AUTH_MODE="token", RAY_ADDRESS=self.address, PYTHONPATH=REPO,
                    HF_HUB_OFFLINE="1", **self.env)

    def exec(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Runs `command` inside the head, as a driver."""
        return subprocess.run(self.driver_command(command), env=self.driver_env(), cwd=REPO, **kwargs)

    def popen(self, command: list[str], **kwargs) -> subprocess.Popen:
        """Starts `command` inside the head, as a driver, in a process group of its own."""
        return subprocess.Popen(self.driver_command(command), env=self.driver_env(), cwd=REPO,
                                start_new_session=True, preexec_fn=sigint_default, **kwargs)

    def copy_into(self, name: str, source: str, target: str) -> None:
        """Copies `source` (seen by every host) to `target` in host `name`'s private filesystem."""
        subprocess.run(["nsenter", "-t", str(self.hosts[name].proc.pid), "-m", "cp", "-r", source, target],
                       check=True, capture_output=True)

    def pids(self, name: str) -> list[int]:
        return [int(pid) for pid in _run("ip", "netns", "pids", self.hosts[name].netns).stdout.split()]

    def kill(self, name: str) -> None:
        """SIGKILLs every process of host `name` (its Ray node and every replica on it)."""
        host = self.hosts[name]
        for _ in range(3):  # processes forked while the first ones die
            for pid in self.pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if host.proc is not None:
            host.proc.wait(10)

    def __exit__(self, *exc) -> None:
        for name in reversed(list(self.hosts)):
            self.kill(name)
        for host in self.hosts.values():
            _run("ip", "netns", "del", host.netns, check=False)
            _run("ip", "link", "del", f"swv{host.index}", check=False)
        _run("ip", "link", "del", BRIDGE, check=False)
