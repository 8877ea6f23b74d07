"""Hand-written GPU kernels (Triton), each with a launcher, a torch reference and a parity test.

Nothing here imports triton: the kernel modules (e.g. `kernels.temporal_conv`) are imported only where a kernel is
about to run, so the runtime works without triton, and a test can set TRITON_INTERPRET=1 before triton's
`@triton.jit` decorators read it (they read it when the kernel module is imported).

Two kernels: `temporal_conv` (Temp-Conv layer as one GEMM) and `short_attention` (Temp-Attn along a clip's frames).
The short-attention kernel is chosen per model like any Temp-Attn form (RuntimeConfig.temporal_attention, on by
default on CUDA: faster in the compiled step, bench/RESULTS.md). The switch below governs the Temp-Conv kernel:
it runs only while `enabled()`; default off until `bench/kernel_bench.py` shows a gain on the GPU.
`VIDRD_RT_KERNELS=1` turns it on for a process; `use_kernels(flag)` / `disabled()` scope it in code. Dynamo
guards on the flag, so a compiled graph built with one setting is recompiled, never reused, under the other.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

# Checked once, without importing triton: find_spec does not run the package. triton_op (torch >= 2.6) is what
# lets torch.compile(fullgraph=True) trace the kernels instead of breaking the graph.
_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")

_enabled = os.environ.get("VIDRD_RT_KERNELS", "0") == "1"


def triton_available() -> bool:
    return _TRITON


def enabled() -> bool:
    """Whether layers may route to the Triton kernels (each layer still checks device, dtype and layout)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def use_kernels(flag: bool = True) -> Iterator[None]:
    """Kernels on (or off) inside the block; the previous setting comes back on exit, also on an exception."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        _enabled = previous


def disabled() -> contextlib.AbstractContextManager:
    """The off switch: inside it every layer runs its reference torch ops (export, parity checks)."""
    return use_kernels(False)
