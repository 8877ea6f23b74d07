"""The engine folder's manifest: what the engines were built from and for, and a sha256 of every file in it.

Layout of an engine folder (one backend, one EngineShapes):

    manifest.json                      rewritten atomically after each network: it lists what is finished
    unet.onnx + unet.onnx.data         ONNX graph + its one external-data file (vidrd-base: ~2.4 GB in fp16)
    decoder.onnx + decoder.onnx.data
    text_encoder.onnx + text_encoder.onnx.data
    unet.plan, decoder.plan, text_encoder.plan, timing.cache       (tensorrt only)

Each artefact carries a key: a hash of everything it depends on (backend, model config, its network's weights,
shapes and precision, attention form, opset, device, GPU and library versions). Equal key and intact files: reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..runtime.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "vidrd-rt-engines/1"  # bump when export code changes what a file holds
BACKEND_LIBRARIES = {"onnxruntime": ("torch", "onnx", "onnxruntime"), "tensorrt": ("torch", "onnx", "tensorrt")}


class EngineError(UserError):
    """The engine folder is missing, stale or corrupted; the message says why and how to rebuild."""


#################################################################################
#                          Fingerprints of inputs                                #
#################################################################################


def weights_hash(module: nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes (all of them: sound, not sampled).

    Tensors are hashed in parallel threads (hashlib releases the GIL; ~0.9 GB/s per thread on this project's CPU
    machines), then their digests in name order. bench/ort_vs_torch.py times it for vidrd-base's UNet.
    """
    def one(item: tuple[str, torch.Tensor]) -> str:
        name, t = item
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        return f"{name} {str(t.dtype)} {tuple(t.shape)} {hashlib.sha256(raw).hexdigest()}"

    items = sorted(module.state_dict().items())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        lines = list(pool.map(one, items))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def library_versions(backend: str) -> dict[str, str | None]:
    """Versions of the libraries an engine of `backend` depends on (None where not importable)."""
    versions = {}
    for name in BACKEND_LIBRARIES[backend]:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def environment(device: str, backend: str) -> dict:
    """Where engines are built and used: device type, GPU name and compute capability (None on CPU), versions."""
    dev = torch.device(device)
    gpu = capability = None
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        capability = "%d.%d" % torch.cuda.get_device_capability(index)
    return {"device": dev.type, "gpu": gpu, "compute_capability": capability,
            "versions": library_versions(backend)}


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


#################################################################################
#                                 The manifest                                  #
#################################################################################


@dataclass
class Manifest:
    """`identity` is what the engines were built from and for; `artefacts` maps name -> {key, files: {file: sha}}."""

    identity: dict
    config: dict
    artefacts: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def expected(cls, model, backend: str, shapes, device: str, attention: str, opset: int,
                 weights: dict[str, str]) -> "Manifest":
        """What a folder built now from `model` would hold (artefacts empty)."""
        identity = {
            "format": FORMAT,
            "backend": backend,
            "model": {"name": model.config.name, "config_hash": model.config.fingerprint(), "weights": weights},
            "shapes": shapes.to_dict(),
            "attention": attention,
            "opset": opset,
            "environment": environment(device, backend),
        }
        return cls(identity, model.config.to_dict())

    @property
    def shapes(self):
        from .specs import EngineShapes

        return EngineShapes.from_dict(self.identity["shapes"])

    def key(self, network: str) -> str:
        """Everything one network's artefact depends on: the identity with only that network's weights."""
        identity = dict(self.identity)
        identity["model"] = {**identity["model"], "weights": {network: identity["model"]["weights"].get(network)}}
        return _digest(identity)

    def to_json(self) -> str:
        return json.dumps({"identity": self.identity, "config": self.config, "artefacts": self.artefacts}, indent=1)

    def save(self, folder: Path) -> None:
        """Atomic: a reader sees the old manifest or the new one, never half of one."""
        tmp = folder / f".{MANIFEST}.partial"
        tmp.write_text(self.to_json())
        os.replace(tmp, folder / MANIFEST)

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        """Raises EngineError when the folder has no readable manifest."""
        path = folder / MANIFEST
        if not path.is_file():
            raise EngineError(f"{folder} holds no {MANIFEST}")
        try:
            raw = json.loads(path.read_text())
            return cls(raw["identity"], raw["config"], raw["artefacts"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise EngineError(f"{path} is unreadable ({type(e).__name__})") from None


ORDER = ("format", "backend", "model", "shapes", "attention", "opset", "environment")  # most telling first


def difference(want: dict, found: dict, path: str = "") -> str | None:
    """The first field where two identities differ, as a short phrase naming it; None when equal."""
    rank = {name: i for i, name in enumerate(ORDER)}
    for name in sorted(set(want) | set(found), key=lambda n: (rank.get(n, len(ORDER)), n)):
        a, b = want.get(name), found.get(name)
        where = f"{path}.{name}" if path else name
        if where == "environment" and isinstance(a, dict) and isinstance(b, dict) and _machine(a) != _machine(b):
            return f"built on {_machine(b)}, this run has {_machine(a)}"
        if isinstance(a, dict) and isinstance(b, dict):
            inner = difference(a, b, where)
            if inner:
                return inner
        elif a != b:
            return _describe(where, b, a)
    return None


def _machine(env: dict) -> str:
    if env.get("device") != "cuda":
        return str(env.get("device"))
    return f"{env.get('gpu')} (compute capability {env.get('compute_capability')})"


def _describe(where: str, built: object, now: object) -> str:
    """Say which of model, shapes, precision, GPU or versions changed, in words a user can act on."""
    leaf = where.rsplit(".", 1)[-1]
    if where.startswith("model.weights"):
        return f"other {leaf} weights than the engines were built from"
    if where.startswith("model"):
        return f"another model ({leaf} {built} at build, {now} now)"
    if where == "shapes.precision":
        return f"precision {built} at build, {now} now"
    if where.startswith("shapes"):
        return f"built for {leaf}={built}, asked for {now}"
    if where.startswith("environment.versions"):
        return f"{leaf} {built} at build, {now} now"
    return f"{where} {built} at build, {now} now"


def check_files(folder: Path, entry: dict) -> str | None:
    """Why an artefact's files are unusable (missing or not the bytes written), or None when intact."""
    for name, sha in entry.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != sha:
            return f"{name} is corrupted (sha256 differs from the manifest)"
    return None if entry.get("files") else "no files recorded"


def stale_reason(folder: Path, want: Manifest, found: Manifest, name: str, network: str) -> str | None:
    """Why artefact `name` (built from `network`) in `found` cannot serve `want`; None when it can."""
    entry = found.artefacts.get(name)
    if entry is None:
        return f"{name} was never built here"
    scoped = lambda m: {**m.identity, "model": {**m.identity.get("model", {}),  # noqa: E731
                                               "weights": {network: m.identity.get("model", {}).get("weights", {})
                                                           .get(network)}}}
    why = difference(scoped(want), scoped(found))
    if why:
        return why
    if entry.get("key") != want.key(network):
        return f"{name} does not match its manifest entry (written by another vidrd-rt?)"
    return check_files(folder, entry)
