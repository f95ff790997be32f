"""Weights that travel: a stage on a node without the checkpoint fetches just its own tensors.

The checkpoint need be on one node only: the ingress's (where the application was built; the
default model is converted there). The ingress runs a small `WeightServer` actor on that node,
which serves the checkpoint's small files, its safetensors headers and byte ranges of its tensors,
and a checksum per tensor. A stage whose node lacks the files (`local_checkpoint`) mirrors the
checkpoint in a local cache keyed by its content (a hash of config.json and every safetensors
header): the small files whole, each safetensors file as a sparse file of the same size holding
the header and only the tensors this node's stages read, each streamed in chunks (bounded memory)
and checked against its checksum. So `stages/` reads the mirror as any checkpoint, a restart
fetches nothing, and a changed checkpoint has another key and is fetched anew.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct

logger = logging.getLogger("ray.serve")

CHUNK_BYTES = 16 * 2**20
SMALL_FILE_BYTES = 64 * 2**20  # config, tokenizer, index...: sent whole
STATE_FILE = "stagewise-fetched.json"  # tensor -> sha256, for what this node already holds


def weights_name(app_name: str) -> str:
    return f"stagewise-weights:{app_name}"


def has_checkpoint(model_dir: str) -> bool:
    """Whether the checkpoint's files are here (config and every safetensors file it names)."""
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        return False
    from stages.loading import weight_map

    try:
        return all(os.path.exists(os.path.join(model_dir, f)) for f in set(weight_map(model_dir).values()))
    except (OSError, ValueError):
        return False


def _header(path: str) -> bytes:
    """The first 8 bytes and the JSON header of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        return head + f.read(struct.unpack("<Q", head)[0])


class WeightServer:
    """Serves a checkpoint directory to stages on other nodes (run as a Ray actor on its node).

    Args:
        model_dir: the checkpoint directory.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self._checksums: dict[tuple[str, str], str] = {}

    def manifest(self) -> dict:
        """{"key", "small": {name: bytes}, "safetensors": {name: {"size", "header"}}}."""
        small, tensors = {}, {}
        # the directory's files, and those one folder down (sentence-transformers' `1_Pooling/`)
        top = sorted(os.listdir(self.model_dir))
        names = top + [f"{d}/{f}" for d in top if os.path.isdir(os.path.join(self.model_dir, d)) and
                       not d.startswith(".") for f in sorted(os.listdir(os.path.join(self.model_dir, d)))]
        for name in names:
            path = os.path.join(self.model_dir, name)
            if not os.path.isfile(path) or "/" in name and name.endswith(".safetensors"):
                continue
            if name.endswith(".safetensors"):
                tensors[name] = {"size": os.path.getsize(path), "header": _header(path)}
            elif os.path.getsize(path) <= SMALL_FILE_BYTES:
                with open(path, "rb") as f:
                    small[name] = f.read()
        digest = hashlib.sha256(small.get("config.json", b""))
        for name, info in tensors.items():
            digest.update(name.encode() + info["header"])
        return {"key": digest.hexdigest()[:32], "small": small, "safetensors": tensors}

    def read(self, file_name: str, offset: int, length: int) -> bytes:
        """`length` bytes (at most a chunk) of a safetensors file from `offset`."""
        if os.path.basename(file_name) != file_name or not file_name.endswith(".safetensors"):
            raise ValueError(f"not a safetensors file of the checkpoint: {file_name!r}")
        with open(os.path.join(self.model_dir, file_name), "rb") as f:
            f.seek(offset)
            return f.read(min(length, CHUNK_BYTES))

    def checksum(self, file_name: str, tensor: str) -> str:
        """sha256 of one tensor's stored bytes."""
        key = (file_name, tensor)
        if key not in self._checksums:
            offset, length = tensor_range(_header(os.path.join(self.model_dir, file_name)), tensor)
            digest = hashlib.sha256()
            with open(os.path.join(self.model_dir, file_name), "rb") as f:
                f.seek(offset)
                while length:
                    chunk = f.read(min(length, CHUNK_BYTES))
                    digest.update(chunk)
                    length -= len(chunk)
            self._checksums[key] = digest.hexdigest()
        return self._checksums[key]


def tensor_range(header: bytes, tensor: str) -> tuple[int, int]:
    """(file offset, bytes) of a tensor, from its file's header."""
    info = json.loads(header[8:])[tensor]
    start, end = info["data_offsets"]
    return len(header) + start, end - start


def cache_root() -> str:
    from app.default_model import cache_dir

    return os.path.join(cache_dir(), "weights")


def local_checkpoint(model_dir: str, start: int, end: int, app_name: str, stage_name: str) -> tuple[str, int]:
    """A directory on this node from which the stage of blocks `[start, end)` can load.

    `model_dir` itself when the checkpoint is here; otherwise this node's mirror of it, with
    whatever tensors the stage needs fetched from the `WeightServer` first.

    Returns:
        (directory, bytes fetched now).
    """
    if has_checkpoint(model_dir):
        return model_dir, 0
    import time

    import ray

    deadline = time.monotonic() + 60  # the ingress may still be starting its WeightServer
    while True:
        try:
            server = ray.get_actor(weights_name(app_name))
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise FileNotFoundError(f"{model_dir} is not on this node, and no node serves it "
                                        "(the ingress's WeightServer is missing)") from None
            time.sleep(1)
    manifest = ray.get(server.manifest.remote())
    mirror = os.path.join(cache_root(), manifest["key"])
    os.makedirs(mirror, exist_ok=True)
    with open(os.path.join(mirror, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # stages on this node fetch one at a time, nothing twice
        _write_skeleton(mirror, manifest)
        from transformers import AutoConfig

        from stages import encoder, stage

        kind = encoder if encoder.is_encoder(AutoConfig.from_pretrained(mirror)) else stage
        needed = kind.stored_tensors(mirror, start, end)
        fetched = _fetch(server, mirror, manifest, needed)
    logger.info("%s: %s %.1f MiB of its tensors (%d) from the checkpoint's node into %s", stage_name,
                "fetched" if fetched else "had", (fetched or _bytes_of(manifest, needed)) / 2**20, len(needed),
                mirror)
    return mirror, fetched


def _write_skeleton(mirror: str, manifest: dict) -> None:
    """The small files, and each safetensors file as a sparse file with its header."""
    for name, data in manifest["small"].items():
        path = os.path.join(mirror, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path + ".part", "wb") as f:
                f.write(data)
            os.replace(path + ".part", path)
    for name, info in manifest["safetensors"].items():
        path = os.path.join(mirror, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(info["header"])
                f.truncate(info["size"])  # the rest is a hole until its tensors arrive


def _files_of(manifest: dict) -> dict[str, str]:
    """Tensor -> the safetensors file that holds it."""
    return {tensor: name for name, info in manifest["safetensors"].items()
            for tensor in json.loads(info["header"][8:]) if tensor != "__metadata__"}


def _bytes_of(manifest: dict, tensors: set[str]) -> int:
    files = _files_of(manifest)
    return sum(tensor_range(manifest["safetensors"][files[t]]["header"], t)[1] for t in tensors)


def _fetch(server, mirror: str, manifest: dict, needed: set[str]) -> int:
    """Fetches the tensors the mirror lacks; returns the bytes moved."""
    import ray

    state_path = os.path.join(mirror, STATE_FILE)
    held = json.load(open(state_path)) if os.path.exists(state_path) else {}
    files, moved = _files_of(manifest), 0
    for tensor in sorted(needed - set(held)):
        name = files[tensor]
        offset, length = tensor_range(manifest["safetensors"][name]["header"], tensor)
        digest = hashlib.sha256()
        with open(os.path.join(mirror, name), "r+b") as f:
            f.seek(offset)
            for at in range(offset, offset + length, CHUNK_BYTES):
                chunk = ray.get(server.read.remote(name, at, min(CHUNK_BYTES, offset + length - at)))
                digest.update(chunk)
                f.write(chunk)
                moved += len(chunk)
        expected = ray.get(server.checksum.remote(name, tensor))
        if digest.hexdigest() != expected:
            raise OSError(f"tensor {tensor} arrived damaged (sha256 {digest.hexdigest()[:12]}, "
                          f"expected {expected[:12]})")
        held[tensor] = expected
        with open(state_path + ".part", "w") as f:
            json.dump(held, f)
        os.replace(state_path + ".part", state_path)
    return moved
