"""Many users at once against a real served app (issue 10): 20 concurrent inspects through gradio_client, idle
and with a training run active, for this checkout's server and for the serial server of an earlier commit,
side by side in one run. Writes bench/results/load.md.

Each server is a fresh `python -m app` subprocess on a free loopback port with its own sessions and upload
folders. Latency is measured per request from the moment all clients fire together (a barrier) to its answer.
The training run's slowdown compares its step times while the burst runs with its step times just before.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
QUESTIONS = ["What digit is in row 1 column 2?", "Read row 2.", "Where is the 7?", "What digit is in row 3 column 3?",
             "Read row 1."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout(rev: str, dest: Path) -> Path:
    """The tree of commit `rev` (the serial server of before), extracted with `git archive`."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    tar = dest / "src.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return dest


class Server:
    def __init__(self, code_dir: Path, work: Path, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.sessions = work / "sessions"
        env = dict(os.environ, RAL_HOST="127.0.0.1", RAL_PORT=str(self.port), RAL_SESSIONS_ROOT=str(self.sessions),
                   GRADIO_TEMP_DIR=str(work / "gradio"), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONPATH=str(code_dir), **(extra_env or {}))
        self.log = open(work / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=code_dir, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if httpx.get(self.url + "config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {work / 'server.log'}")
            time.sleep(0.5)
        raise RuntimeError("server did not start in 120 s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _client(url):
    """A client that does not fetch the result files: a browser fetches only the two images it shows, and on this
    one machine the client's own downloading would compete with the server it measures."""
    from gradio_client import Client
    return Client(url, verbose=False, download_files=False)


def burst(url: str, n: int) -> dict:
    """n clients (own sessions) inspect at the same moment; latency per request and the errors."""
    from gradio_client import handle_file

    images = sorted(EXAMPLES.glob("grid3_*.png"))
    clients = [_client(url) for _ in range(n)]
    barrier, lat, errors = threading.Barrier(n + 1), [None] * n, []
    t_start = [0.0]

    def one(i):
        c = clients[i]
        barrier.wait()
        t0 = time.perf_counter()
        try:
            out = c.predict("default", handle_file(images[i % len(images)]), QUESTIONS[i % len(QUESTIONS)], 16, False,
                            1.0, "last", "predicts", api_name="/inspect")
            if out[0]:
                errors.append(out[0])
            lat[i] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 — counted, reported
            errors.append(f"{type(e).__name__}: {e}"[:200])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t_start[0] = time.time()
    for t in threads:
        t.join(300)
    return {"lat": [x for x in lat if x is not None], "errors": errors, "start": t_start[0], "end": time.time()}


def summary(bursts: list[dict]) -> dict:
    """p50 / p95 / max over every request of every burst, and the errors."""
    done = sorted(x for b in bursts for x in b["lat"])
    errors = [e for b in bursts for e in b["errors"]]
    q = (lambda p: done[min(len(done) - 1, int(round(p * (len(done) - 1))))]) if done else (lambda p: float("nan"))
    return {"requests": len(done) + len(errors), "ok": len(done), "errors": len(errors), "error_samples": errors[:3],
            "p50": q(0.5), "p95": q(0.95), "max": done[-1] if done else float("nan")}


def single(url: str, reps: int = 5) -> float:
    from gradio_client import handle_file

    c = _client(url)
    img = EXAMPLES / "grid3_row.png"
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.predict("default", handle_file(img), "Read row 2.", 16, False, 1.0, "last", "predicts", api_name="/inspect")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class StepWatch(threading.Thread):
    """Records when each training step's metric line appears (the step ran just before that moment)."""

    def __init__(self, sessions: Path):
        super().__init__(daemon=True)
        self.sessions, self.seen, self.stop = sessions, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                files = list(self.sessions.rglob("metrics.jsonl"))
            except OSError:  # a session folder removed while listing (a cancelled run cleaned up)
                files = []
            for f in files:
                try:
                    for ln in f.read_text().splitlines():
                        if ln.strip():
                            m = json.loads(ln)
                            self.seen.setdefault(int(m["step"]), (time.time(), float(m["step_time"])))
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)


def with_training(url: str, sessions: Path, n: int, steps: int, rounds: int) -> dict:
    """`rounds` bursts while a training run goes on. Its slowdown: the mean duration of the steps that overlapped a
    burst over the mean of the steps between bursts (the first two steps, warm-up, left out)."""
    trainer = _client(url)
    out = trainer.predict("grounding", None, "grpo", "default", None, steps, 1e-4, 1.0, 8, 8, 1.0, 1.0, "levers", 12,
                          100, 0, "", api_name="/train_start")
    if out[0]:
        raise RuntimeError(f"training did not start: {out[0]}")
    watch = StepWatch(sessions)
    watch.start()

    def wait_steps(k, after=0.0):
        t0 = time.time()
        while sum(seen > after for seen, _ in watch.seen.values()) < k and time.time() - t0 < 300:
            time.sleep(0.1)
    wait_steps(6)
    bursts = []
    for _ in range(rounds):
        bursts.append(burst(url, n))
        wait_steps(4, after=bursts[-1]["end"])  # the step running at the end, then 3 quiet ones
    watch.stop.set()
    trainer.predict(api_name="/train_cancel")
    spans = [(seen - st, seen, st) for s, (seen, st) in watch.seen.items() if s >= 2]
    over = lambda a, b: any(a < x["end"] and b > x["start"] for x in bursts)  # noqa: E731
    during = [st for a, b, st in spans if over(a, b)]
    quiet = [st for a, b, st in spans if not over(a, b)]
    base = statistics.mean(quiet) if quiet else float("nan")
    slow = statistics.mean(during) if during else float("nan")
    return {**summary(bursts), "step_before": base, "step_during": slow, "slowdown": slow / base,
            "steps_during": len(during), "steps_quiet": len(quiet)}


def measure(label: str, code_dir: Path, work: Path, n: int, steps: int, rounds: int) -> dict:
    srv = Server(code_dir, work)
    try:
        single(srv.url, 2)  # warm-up: model load, render workers
        res = {"label": label, "single": single(srv.url)}
        idle = []
        for _ in range(rounds):
            idle.append(burst(srv.url, n))
            time.sleep(1.0)
        res["idle"] = summary(idle)
        res["train"] = with_training(srv.url, srv.sessions, n, steps, rounds)
        return res
    finally:
        srv.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.md"))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--baseline-rev", default="04a5bda", help="commit of the serial server to compare with")
    p.add_argument("--steps", type=int, default=200, help="length of the training run (it is cancelled after)")
    p.add_argument("--rounds", type=int, default=3, help="bursts per scenario")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ral_load_"))
    load0 = os.getloadavg()
    rows = []
    try:
        old = checkout(a.baseline_rev, tmp / "baseline_src")
        for label, code in ((f"serial (commit {a.baseline_rev})", old), ("this checkout", ROOT)):
            work = tmp / label.split()[0]
            work.mkdir()
            rows.append(measure(label, code, work, a.clients, a.steps, a.rounds))
            print(json.dumps(rows[-1], default=str)[:600], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write(a, rows, load0)


def write(a, rows, load0):
    f = lambda x: f"{x:.2f}"  # noqa: E731
    lines = ["# Many users at once: concurrent inspects against a served app", "",
             f"Command: `python {' '.join(['bench/load_bench.py'] + sys.argv[1:])}` (`make bench-load`) · "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {os.cpu_count()} cores · load average before "
             f"{load0[0]:.2f} · default model; {a.rounds} bursts per scenario of {a.clients} gradio_client sessions "
             "firing together (percentiles over all their requests), each uploading "
             "an example image with its own question (16 new tokens, greedy); clients do not download the result files. "
             "The training run is GRPO on the bundled task (8 prompts × 8 rollouts, 12 new tokens), started from the "
             "Train endpoint; its slowdown is the mean time of the steps that overlapped a burst over the mean of the steps "
             "between bursts.", "",
             "| server | one request alone s | idle: p50 s | idle: p95 s | idle: errors | with training: p50 s | "
             "with training: p95 s | errors | training s/step between → during bursts (steps) | slowdown |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i, t = r["idle"], r["train"]
        lines.append(f"| {r['label']} | {f(r['single'])} | {f(i['p50'])} | {f(i['p95'])} | {i['errors']} | "
                     f"{f(t['p50'])} | {f(t['p95'])} | {t['errors']} | {f(t['step_before'])} → {f(t['step_during'])} "
                     f"({t['steps_quiet']} / {t['steps_during']} steps) | {t['slowdown']:.2f}× |")
    if len(rows) == 2:
        o, n = rows
        lines += ["", f"Ratios (this checkout / serial): idle p95 {n['idle']['p95'] / o['idle']['p95']:.2f}, "
                  f"with-training p95 {n['train']['p95'] / o['train']['p95']:.2f}."]
    lines += ["", "Goals (issue 10): 0 errors; p95 ≤ 5 s idle and ≤ 8 s with a training run active; that run slowed "
              "≤ 1.5×. The serial server is the app as it was before the hardening (one global model lock, one "
              "request at a time), run from its commit with the same Python environment."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
