"""This CPU's identity (model name, the ISA flags that move kernel costs, vendor family/model/stepping) and memory.

A leaf module: latency tables record and compare these (``targets.table``), the profiler stamps them on
what it measures, and ``doctor`` reports them; none of those may import each other for it.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ISA extensions that change which ONNX Runtime CPU kernels are fast (int8 dot products above all):
# two CPUs with the same name but different sets time the same graph differently.
LATENCY_ISA = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
               "asimddp", "i8mm", "sve", "sme")


def cpu_features() -> tuple[str, ...]:
    """The LATENCY_ISA flags this CPU reports (from /proc/cpuinfo on Linux; empty where unreadable)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return tuple(f for f in LATENCY_ISA if f in flags)


def cpu_id() -> str:
    """Vendor family/model/stepping (e.g. ``AuthenticAMD 25/1/1``): tells apart CPUs that share a name."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        return platform.machine()
    return (f"{fields.get('vendor_id', '?')} {fields.get('cpu family', '?')}/{fields.get('model', '?')}/"
            f"{fields.get('stepping', '?')}")


def memory_bytes() -> int | None:
    """Total physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> int:
    """Memory a new allocation can have now (Linux ``MemAvailable``), else the total, else 0."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return memory_bytes() or 0


def release_freed_memory() -> bool:
    """Give the heap memory this process has freed back to the system (glibc's ``malloc_trim(0)``).

    Why: glibc keeps freed heap for reuse, and after the first large free it serves ever larger tensors from
    the heap (its mmap threshold follows the largest freed block, up to 32 MiB), so a phase that builds
    big tensors and drops them (the supernet's whole weights before FSDP shards them) leaves its peak in the
    process's resident memory for the rest of the run. ``malloc_trim(0)`` returns the free pages in the
    middle of the heap too (``madvise(MADV_DONTNEED)``), once, with no cost to later allocations beyond
    faulting pages back in where they are reused.

    Returns True where it ran (glibc), False elsewhere (musl, macOS, Windows: a no-op).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
