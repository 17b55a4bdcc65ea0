"""Shared helpers for the benchmarks in bench/: machine description, peak-RSS tracking on Linux, contention check.

This machine is shared (see docs/DESIGN §3): benchmarks pin torch threads, compare modes side by side in one run,
and report the CPU time they actually got next to wall time (CPU/wall well below 1 for a 1-thread run means
another process was taking the core).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys

# glibc settings that make freed tensor memory go back to the OS at once, so that RSS follows live tensors:
# a fixed mmap threshold (which also switches off glibc's dynamic threshold that would otherwise move large
# freed blocks into the heap and keep them), a small trim threshold, and few arenas.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def proc_status_mb() -> dict[str, float]:
    """VmRSS (current resident set) and VmHWM (peak resident set since start or last reset), in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) / 1024.0
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def busy_processes(limit: int = 4, exclude: set[int] | None = None) -> list[str]:
    """The most CPU-hungry other processes right now (ps %cpu is a lifetime average: a hint, not a measure)."""
    exclude = exclude or set()
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,comm,args", "--sort=-pcpu", "--no-headers"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) < 4 or int(parts[0]) in exclude or float(parts[1]) < 5.0:
            continue
        args = parts[4] if len(parts) > 4 else parts[3]
        rows.append(f"pid {parts[0]} {parts[1]}% cpu (up {parts[2]}): {args[:90]}")
        if len(rows) >= limit:
            break
    return rows


def machine_info() -> dict[str, str]:
    import torch
    import transformers

    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg": loadavg(),
    }


def contention_section(meta: dict, worst: float, busy_before: list[str], busy_after: list[str],
                       measured: str = "Lowest median CPU/wall over all timings") -> list[str]:
    """The results files' 'Contention check': load, CPU/wall of the timed process, and the busiest neighbours."""
    L = ["## Contention check\n",
         f"Load average at start / end: {meta['loadavg']} / {loadavg()}. {measured}: {worst:.2f} (1.00 = this "
         "process had its core to itself)."
         + (" Other processes took part of the core, so wall-clock numbers are inflated by about 1/(CPU/wall); "
            "the CPU-time figures and ratios are the ones to read." if worst < 0.9 else "") + "\n"]
    if busy_before or busy_after:
        L.append("Busiest other processes (ps lifetime %cpu, a hint) at start:\n")
        L += [f"- {b}" for b in busy_before] or ["- none"]
        L.append("\n…and at the end:\n")
        L += [f"- {b}" for b in busy_after] or ["- none"]
        L.append("")
    return L


def write_report(md: str, out: str | None, dry: bool, log=print) -> None:
    """Write the results file, or print it for a quick/smoke run (which must not overwrite measured numbers)."""
    if out and not dry:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(md)
        log(f"wrote {out}")
    else:
        print(md)


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
