"""The benchmarks' small library: start-up, machine description, peak-RSS tracking on Linux, contention check,
records and the paired statistics of the evidence documents.

Benchmarks run as scripts (`python bench/NAME.py`), so this folder is on sys.path and `import _common` just works.
The machine is shared: benchmarks pin torch threads, compare modes side by side in one run, and report the CPU
time they actually got next to wall time (CPU/wall well below 1 for a 1-thread run means another process was
taking the core).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# glibc settings that make freed tensor memory go back to the OS at once, so that RSS follows live tensors:
# a fixed mmap threshold (which also switches off glibc's dynamic threshold that would otherwise move large
# freed blocks into the heap and keep them), a small trim threshold, and few arenas.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False"}


def start(threads: bool = True) -> None:
    """The environment every benchmark runs in (values already set win). Call it before torch is imported: OpenMP
    reads its thread count once, and worker threads start with it."""
    for k, v in ({**THREAD_ENV, **OFFLINE_ENV} if threads else OFFLINE_ENV).items():
        os.environ.setdefault(k, v)


def logger(name: str | None = None):
    """Progress lines on stderr (stdout may carry the report): '[name HH:MM:SS] msg', or the bare msg."""
    import time

    def log(msg):
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}" if name else msg, file=sys.stderr, flush=True)
    return log


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


# the CPU features that decide how fast fp32 / bf16 matmuls run: bf16 twins are ~3× slower than fp32 without native
# bf16 (avx512_bf16 or amx_bf16), so a CPU-time figure means little without them
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def library_versions() -> dict[str, str]:
    """Versions of the libraries a figure depends on (the ones importable here)."""
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "numpy", "accelerate", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def code_version() -> str:
    """The commit the measured code came from, and the ral_core/ files that differed from it (a shared working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ral_core"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    files = [ln[3:] for ln in dirty if ln.strip()]
    return f"commit {head or 'unknown'}" + (f" + uncommitted changes in {', '.join(files)}" if files else "")


def machine_info() -> dict[str, str]:
    flags = cpu_flags()
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "cpu_flags": " ".join(f for f in SPEED_FLAGS if f in flags) or "unknown",
        "native_bf16": "yes" if native_bf16 else "no" if flags else "unknown",
        **library_versions(),
        "loadavg": loadavg(),
    }


# (m, k, n) of the matmuls a 2B VLM runs: a prompt's MLP (prefill, training), a decode step's MLP for a group of 8, and
# one decode step's LM head over a 151,936-token vocabulary (matrix × vector)
MATMUL_SHAPES = ((1024, 1536, 8960), (8, 1536, 8960), (1, 1536, 151936))


def bf16_matmul_speed(rounds: int = 5, shapes=MATMUL_SHAPES) -> list[dict]:
    """bf16 / fp32 CPU time of one-thread matmuls on this CPU, per shape: the two dtypes alternate within each round
    and the ratio is taken per round (median and min–max over rounds). Whether bf16 is fast depends on the CPU's
    native bf16 (avx512_bf16, amx_bf16): without it bf16 runs several times slower than fp32."""
    import time

    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for m, k, n in shapes:
            g = torch.Generator().manual_seed(0)
            a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
            pair = {torch.float32: (a32, b32), torch.bfloat16: (a32.bfloat16(), b32.bfloat16())}
            reps = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GFLOP per timing, so small shapes are not all noise
            t = {dt: [] for dt in pair}
            for dt, (a, b) in pair.items():  # warm-up: kernels, allocator
                torch.mm(a, b)
            for r in range(rounds):
                for dt in (list(pair) if r % 2 == 0 else list(pair)[::-1]):
                    a, b = pair[dt]
                    c0 = time.process_time()
                    for _ in range(reps):
                        torch.mm(a, b)
                    t[dt].append((time.process_time() - c0) / reps)
            ratios = [x / y for x, y in zip(t[torch.bfloat16], t[torch.float32])]
            out.append({"shape": [m, k, n], "fp32_ms": median(t[torch.float32]) * 1e3,
                        "bf16_ms": median(t[torch.bfloat16]) * 1e3, "ratio": median(ratios),
                        "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds})
    finally:
        torch.set_num_threads(threads)
    return out


def bf16_line(speed: list[dict]) -> str:
    """bf16_matmul_speed's result in one sentence for a results file."""
    return "bf16 / fp32 matmul CPU time on this CPU (one thread, per-round ratios, median (min–max)): " + "; ".join(
        f"{m}×{k}×{n}: {r['ratio']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}; {r['fp32_ms']:.1f} ms fp32, "
        f"{r['bf16_ms']:.1f} ms bf16)" for r in speed for m, k, n in [r["shape"]])


def machine_line(meta: dict | None = None) -> str:
    """One line for a results file or record: CPUs, model, speed flags incl. native bf16, library versions."""
    m = meta or machine_info()
    libs = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "transformers", "numpy", "accelerate", "trl")
                     if k in m)
    return (f"{m['nproc']} CPUs, {m['cpu']} (flags: {m.get('cpu_flags', 'unknown')}; native bf16: "
            f"{m.get('native_bf16', 'unknown')}) · {libs}")


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


# ---- records: one small JSON per finished run, deterministic bytes for the same numbers ---------------------------
def round_floats(x, sig: int = 5):
    """Floats to `sig` significant digits (records stay small and diff-friendly); non-finite → None."""
    if isinstance(x, float):
        return float(f"{x:.{sig}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: round_floats(v, sig) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [round_floats(v, sig) for v in x]
    return x


def dump_record(path: Path, rec: dict) -> None:
    """Write a record: rounded, sorted keys, one key per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(round_floats(rec), sort_keys=True, indent=1, ensure_ascii=False) + "\n")


# ---- paired statistics of the evidence documents (no scipy) --------------------------------------------------------
def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value P(|T| ≥ |t|) of Student's t with an integer number of degrees of freedom, exact by the
    finite series of Abramowitz & Stegun 26.7.3–26.7.4 (θ = atan(|t|/√df))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a whole number ≥ 1 (got {df})")
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    df = int(df)
    th = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(th), math.cos(th)
    if df % 2:  # odd: A = 2/π [θ + sinθ cosθ (1 + 2/3 cos²θ + … + (2·4…(df−3))/(1·3…(df−2)) cos^(df−3)θ)]
        term, tot = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c * c
            tot += term
        a = 2 / math.pi * (th + (s * c * tot if df > 1 else 0.0))
    else:  # even: A = sinθ [1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + … + (1·3…(df−3))/(2·4…(df−2)) cos^(df−2)θ]
        term, tot = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c * c
            tot += term
        a = s * tot
    return min(1.0, max(0.0, 1.0 - a))


def paired_t(d) -> dict:
    """Two-sided paired t-test of per-seed differences `d` against 0: mean, SE, t, p, n. All differences exactly
    0: p = 1 (identical); all equal and non-zero (SE 0): p = 0; fewer than 2 seeds: p = nan (no test)."""
    import numpy as np

    d = np.asarray(d, dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "se": float("nan"), "t": float("nan"), "p": float("nan")}
    mean = float(d.mean())
    if n < 2:
        return {"n": n, "mean": mean, "se": float("nan"), "t": float("nan"), "p": float("nan")}
    se = float(d.std(ddof=1) / np.sqrt(n))
    if np.all(d == 0):
        return {"n": n, "mean": 0.0, "se": 0.0, "t": 0.0, "p": 1.0}
    t = mean / se if se > 0 else float("inf") * np.sign(mean)
    return {"n": n, "mean": mean, "se": se, "t": float(t), "p": t_two_sided_p(t, n - 1)}


def holm(pvals) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over all of `pvals`, in their order): the
    i-th smallest p times (m − i + 1), made monotone, capped at 1. nan (no test) stays nan and is not counted."""
    idx = [i for i, p in enumerate(pvals) if p == p]
    m = len(idx)
    out = [float("nan")] * len(pvals)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvals[i])):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        out[i] = running
    return out


def fmt_p(p: float) -> str:
    """A p-value as the documents print it."""
    return "1" if p >= 0.9995 else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def sampled_reward(adapter, task, n, max_new_tokens, G=4) -> float:
    """Mean exact-match reward of temperature-1 samples (can move opposite to greedy accuracy)."""
    import torch

    from ral_core.rewards import RewardModel
    from ral_core.rollout import make_rollouts
    torch.manual_seed(0)
    rm = RewardModel({"exact_match": 1.0})
    samples = [{"image": s.image, "question": s.question, "answer": s.answer, "boxes": s.boxes} for s in task.samples(n)]
    rs = []
    for i in range(0, n, 8):
        ro = make_rollouts(adapter, samples[i:i + 8], G, rm, None, max_new_tokens)
        rs.append(ro.rewards)
    return float(torch.cat(rs).mean())
