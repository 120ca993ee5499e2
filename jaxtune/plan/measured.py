"""What a live process holds and used: bytes of placed arrays per device, the device memory limit,
and the peak memory a run used (what jaxtune.train's final summary adds to its start-up plan); and
`trim_after_compiles`, which hands the XLA compiler's freed working memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import resource
import sys

import jax
import jax.monitoring

from jaxtune.plan.targets import physical_memory_bytes


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes each addressable device holds of the jax.Arrays in `tree` (replicas counted on every device)."""
    per_device: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            name = str(shard.device)
            per_device[name] = per_device.get(name, 0) + math.prod(shard.data.shape) * leaf.dtype.itemsize
    return per_device


def device_memory_limit(device) -> int | None:
    """Bytes a device may use: its allocator's limit where the platform reports one (GPU, TPU); on CPU
    this machine's RAM shared by the process's CPU devices."""
    stats = device_memory_stats(device)
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return physical_memory_bytes() // max(1, len(jax.local_devices(backend="cpu")))
    return None


def device_memory_stats(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - platforms without memory stats (CPU) raise or return None
        return {}


def _status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux) in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM on Linux, the high-water mark of this program's own
    memory. Not getrusage's ru_maxrss, which on Linux also counts the memory of the process it was
    started from: a child started with fork or vfork + exec inherits the parent's resident size (its peak,
    under vfork, which Python's subprocess uses), so a run launched from a large Python process reports
    that process's peak as its own. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_rss() -> bool:
    """Start the peak (VmHWM) over from the current resident size, so that `peak_rss_bytes` then measures
    what follows (Linux: /proc/self/clear_refs, value 5). False where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def measured_peak_memory() -> dict[str, int]:
    """What this process used: peak resident set size, and the busiest device's peak allocation where
    the platform reports it (GPU, TPU)."""
    measured = {"peak_rss_bytes": peak_rss_bytes()}
    peaks = [device_memory_stats(device).get("peak_bytes_in_use", 0) for device in jax.local_devices()]
    if any(peaks):
        measured["device_peak_bytes"] = int(max(peaks))
    return measured


# jax.monitoring's event for one XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT), recorded
# right after the compile and before the program first runs.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_trim: dict = {"malloc_trim": None, "min_seconds": None}


def trim_after_compiles(min_seconds: float = 1.0) -> bool:
    """From now on, after every XLA compilation of at least `min_seconds`, return the memory that
    malloc holds free to the system (glibc's malloc_trim(0)), once per process.

    Compiling a train step frees a few hundred MiB of the compiler's working memory into malloc's free
    lists, which keep it resident: it would stay part of the process's resident size while the step
    runs and allocates its own buffers (measured on SmolLM2-135M's train step: ~200 MiB of the peak
    RSS). Short compiles (small helper programs) are skipped, so that the trim's walk over the heap
    is not paid hundreds of times. False where the C library has no malloc_trim (not glibc)."""
    if _trim["malloc_trim"] is None:
        _trim["malloc_trim"] = _malloc_trim()
        if _trim["malloc_trim"] is None:
            return False
        jax.monitoring.register_event_duration_secs_listener(_after_compile)
    _trim["min_seconds"] = min_seconds
    return True


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim
        return None


def _after_compile(event: str, duration_s: float, **_) -> None:
    if event == BACKEND_COMPILE_EVENT and duration_s >= _trim["min_seconds"]:
        _trim["malloc_trim"](0)
