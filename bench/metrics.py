"""Measuring instruments: device sync, peak memory (torch and NVML), and a thread sampling GPU power and utilisation."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MIB = 2**20


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: str) -> None:
    """Wait for queued device work, so a host clock read afterwards covers it."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: str) -> Optional[float]:
    """torch's peak allocated device memory since the last reset_peak, MiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / MIB if is_cuda(device) else None


def rss_mib() -> Optional[float]:
    """Resident host memory of this process now, MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return None


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


##### NVML


@dataclass(frozen=True)
class Sample:
    """One NVML reading: host time (perf_counter), board power W, GPU utilisation %, device memory used MiB."""

    t: float
    power_w: float
    util_pct: float
    used_mib: float


class NvmlDevice:
    """The NVML handle of a torch CUDA device (mapped through CUDA_VISIBLE_DEVICES as torch maps it)."""

    def __init__(self, device: str):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        index = torch.device(device).index or 0
        mapper = getattr(torch.cuda, "_get_nvml_device_index", None)  # honours CUDA_VISIBLE_DEVICES (UUIDs too)
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(mapper(index) if mapper else index)

    def read(self) -> Sample:
        nv, h = self.nvml, self.handle
        return Sample(time.perf_counter(), nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                      float(nv.nvmlDeviceGetUtilizationRates(h).gpu), nv.nvmlDeviceGetMemoryInfo(h).used / MIB)

    def energy_j(self) -> Optional[float]:
        """Board energy counter since driver load, J (None where the GPU does not have one)."""
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0
        except self.nvml.NVMLError:
            return None

    def describe(self) -> dict:
        nv, h = self.nvml, self.handle

        def text(value):
            return value.decode() if isinstance(value, bytes) else value

        return {"gpu": text(nv.nvmlDeviceGetName(h)), "driver": text(nv.nvmlSystemGetDriverVersion()),
                "power_limit_w": nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0}


def open_nvml(device: str) -> tuple[Optional[NvmlDevice], Optional[str]]:
    """(device, None) or (None, why not): no CUDA device, no nvidia-ml-py, or no driver."""
    if not is_cuda(device):
        return None, "not a CUDA device"
    try:
        return NvmlDevice(device), None
    except Exception as e:  # ImportError, NVMLError_*: whichever, the numbers are simply not there
        return None, f"NVML unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Sampler:
    """A daemon thread calling `read()` every `period_s` seconds; `window(t0, t1)` summarises the samples in it.

    NVML reports power averaged and utilisation counted over its own sample period (1/6 s to 1 s, per product),
    so a 50 ms period oversamples; the means are still right, the maxima are those of NVML's averages.
    """

    def __init__(self, read: Callable[[], Sample], period_s: float = 0.05):
        self.read, self.period_s = read, period_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-nvml-sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.read())
            except Exception:  # a failed read (driver hiccup) loses one sample, not the run
                pass
            self._stop.wait(self.period_s)

    def window(self, t0: float, t1: float) -> dict:
        """Mean and max power and utilisation and max memory used over samples with t0 <= t <= t1."""
        inside = [s for s in list(self.samples) if t0 <= s.t <= t1]
        if not inside:
            return {}
        power = [s.power_w for s in inside]
        util = [s.util_pct for s in inside]
        return {"power_mean_w": statistics.fmean(power), "power_max_w": max(power),
                "util_mean_pct": statistics.fmean(util), "util_max_pct": max(util),
                "nvml_used_max_mib": max(s.used_mib for s in inside), "nvml_samples": len(inside)}
