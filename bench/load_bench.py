"""Many users at once against a real served app: concurrent inspects from two kinds of client, idle and with a
training run active, >= 3 bursts each. Writes bench/results/load.md.

Clients: `notebook` — gradio_client.Client as a notebook user runs it, downloading the figures each answer names;
`rest` — a light client on Gradio's REST API (upload the image, POST /gradio_api/call/inspect, read the event
stream), which downloads nothing. Each burst's clients run in one child process of their own, so the report gives
that client process's CPU seconds (on this machine the clients share the server's cores; on a Space they would
not) next to the server's own CPU seconds (server, render workers and training process) over the same burst.

Each server is a fresh `python -m app` subprocess on a free loopback port with its own sessions and upload
folders. Latency is measured per request from the moment all clients fire together (a barrier) to its answer.
The training run's slowdown compares its step times while the bursts run with its step times between them.
`--baseline-rev REV` adds the server of an earlier commit, measured the same way.
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
CLIENTS = ("rest", "notebook")
START_S = 300  # a server's start-up (imports, render workers) on a busy machine


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
        while time.time() - t0 < START_S:
            try:
                if httpx.get(self.url + "config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {work / 'server.log'}")
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"server did not start in {START_S} s; see {work / 'server.log'}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _args(i: int) -> tuple:
    images = sorted(EXAMPLES.glob("grid3_*.png"))
    return images[i % len(images)], QUESTIONS[i % len(QUESTIONS)]


def _rest_inspect(http: httpx.Client, url: str, image: Path, question: str) -> str:
    """One inspect through the REST API; returns its status line ('' when it worked)."""
    with open(image, "rb") as f:
        up = http.post(url + "gradio_api/upload", files={"files": (image.name, f, "image/png")})
    up.raise_for_status()
    img = {"path": up.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": image.name}
    data = ["default", img, question, 16, False, 1.0, "last", "predicts", False, 0]
    ev = http.post(url + "gradio_api/call/inspect", json={"data": data})
    ev.raise_for_status()
    kind = None
    with http.stream("GET", url + f"gradio_api/call/inspect/{ev.json()['event_id']}") as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                if kind == "error":
                    return f"error event: {line[5:].strip()[:200]}"
                return json.loads(line[5:])[0] or ""
    return "the event stream ended without a result"


def client_burst(url: str, kind: str, n: int, start_at: float, offset: int = 0) -> dict:
    """n clients of one kind (own sessions) inspect at `start_at` (wall clock), in this process; latencies, errors
    and this process's CPU seconds over the burst."""
    from gradio_client import Client, handle_file

    tmp = Path(tempfile.mkdtemp(prefix="ral_load_dl_"))
    if kind == "notebook":
        clients = [Client(url, verbose=False, download_files=str(tmp / str(i))) for i in range(n)]
    else:
        clients = [httpx.Client(timeout=300) for _ in range(n)]
    lat, errors = [None] * n, []
    cpu0 = time.process_time()

    def one(i):
        image, question = _args(i + offset)
        time.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        try:
            if kind == "notebook":
                out = clients[i].predict("default", handle_file(image), question, 16, False, 1.0, "last", "predicts",
                                         api_name="/inspect")
                status = out[0]
            else:
                status = _rest_inspect(clients[i], url, image, question)
            if status:
                errors.append(status[:200])
            else:
                lat[i] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 — counted, reported
            errors.append(f"{type(e).__name__}: {e}"[:200])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    cpu = time.process_time() - cpu0
    shutil.rmtree(tmp, ignore_errors=True)
    downloaded = kind == "notebook"
    return {"lat": [x for x in lat if x is not None], "errors": errors, "client_cpu_s": cpu, "downloads": downloaded}


def _server_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of the server and of each process under it (render workers, a training process), by pid."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _cpu_between(before: dict, after: dict) -> float:
    """CPU the server's processes used between two readings (a process gone by the second one is left out)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def burst(srv: "Server", kind: str, n: int) -> dict:
    """One burst from a client process of its own; adds the server's CPU seconds over it."""
    start_at = time.time() + 4.0  # the child imports and connects first; all clients fire together at this time
    s0 = _server_cpu(srv.proc.pid)
    out = subprocess.run([sys.executable, __file__, "--client-burst", srv.url, kind, str(n), repr(start_at)],
                         capture_output=True, text=True, timeout=900)
    s1 = _server_cpu(srv.proc.pid)
    if out.returncode:
        raise RuntimeError(f"client process failed: {out.stderr[-1000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(start=start_at, end=time.time(), server_cpu_s=_cpu_between(s0, s1))
    return res


def summary(bursts: list[dict]) -> dict:
    """p50 / p95 / max over every request of every burst, each burst's p95 (the spread), CPU, and the errors."""
    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] if xs else float("nan")
    done = [x for b in bursts for x in b["lat"]]
    errors = [e for b in bursts for e in b["errors"]]
    return {"requests": len(done) + len(errors), "ok": len(done), "errors": len(errors), "error_samples": errors[:3],
            "p50": pct(done, 0.5), "p95": pct(done, 0.95), "max": max(done, default=float("nan")),
            "burst_p95": [pct(b["lat"], 0.95) for b in bursts],
            "client_cpu_s": statistics.mean(b["client_cpu_s"] for b in bursts),
            "server_cpu_s": statistics.mean(b["server_cpu_s"] for b in bursts)}


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


def start_training(url: str, steps: int):
    """Start the run from one client session and return that client: the run belongs to its session, and a session
    that ends (its client dropped) cancels it."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    out = client.predict(
        "grounding", None, "grpo", "default", None, steps, 1e-4, 1.0, 8, 8, 1.0, 1.0, "levers", 12, 100, 0, "",
        api_name="/train_start")
    if out[0]:
        raise RuntimeError(f"training did not start: {out[0]}")
    return client


def with_training(srv: "Server", n: int, steps: int, rounds: int) -> dict:
    """`rounds` bursts of each client kind while a training run goes on; the run's step times between and during."""
    trainer_client = start_training(srv.url, steps)
    watch = StepWatch(srv.sessions)
    watch.start()

    def wait_steps(k, after=0.0):
        t0 = time.time()
        while sum(seen > after for seen, _ in watch.seen.values()) < k and time.time() - t0 < 300:
            time.sleep(0.1)
    wait_steps(6)
    bursts = {k: [] for k in CLIENTS}
    for _ in range(rounds):
        for kind in CLIENTS:
            bursts[kind].append(burst(srv, kind, n))
            wait_steps(3, after=bursts[kind][-1]["end"])  # the step running at the end, then quiet ones
    watch.stop.set()
    trainer_client.predict(api_name="/train_cancel")
    every = [b for bs in bursts.values() for b in bs]
    spans = [(seen - st, seen, st) for s, (seen, st) in watch.seen.items() if s >= 2]
    over = lambda a, b: any(a < x["end"] and b > x["start"] for x in every)  # noqa: E731
    during = [st for a, b, st in spans if over(a, b)]
    quiet = [st for a, b, st in spans if not over(a, b)]
    base = statistics.mean(quiet) if quiet else float("nan")
    slow = statistics.mean(during) if during else float("nan")
    return {"clients": {k: summary(v) for k, v in bursts.items()}, "step_before": base, "step_during": slow,
            "slowdown": slow / base, "steps_during": len(during), "steps_quiet": len(quiet)}


def measure(label: str, code_dir: Path, work: Path, n: int, steps: int, rounds: int) -> dict:
    srv = Server(code_dir, work)
    try:
        burst(srv, "rest", 2)  # warm-up: model load, render workers
        idle = {k: [] for k in CLIENTS}
        for _ in range(rounds):
            for kind in CLIENTS:
                idle[kind].append(burst(srv, kind, n))
                time.sleep(1.0)
        res = {"label": label, "idle": {k: summary(v) for k, v in idle.items()}}
        res["train"] = with_training(srv, n, steps, rounds)
        return res
    finally:
        srv.close()


def main():
    if sys.argv[1:2] == ["--client-burst"]:  # a burst's client process (see `burst`)
        url, kind, n, start_at = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
        print(json.dumps(client_burst(url, kind, n, start_at)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.md"))
    p.add_argument("--clients", type=int, default=20, help="clients per burst")
    p.add_argument("--baseline-rev", default="", help="also measure the server of this earlier commit")
    p.add_argument("--steps", type=int, default=500, help="length of the training run (cancelled after the bursts)")
    p.add_argument("--rounds", type=int, default=3, help="bursts per client kind and scenario")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ral_load_"))
    load0 = os.getloadavg()
    rows = []
    try:
        servers = [("this checkout", ROOT)]
        if a.baseline_rev:
            servers.insert(0, (f"commit {a.baseline_rev}", checkout(a.baseline_rev, tmp / "baseline_src")))
        for i, (label, code) in enumerate(servers):
            work = tmp / f"server{i}"
            work.mkdir()
            rows.append(measure(label, code, work, a.clients, a.steps, a.rounds))
            print(json.dumps(rows[-1], default=str)[:800], flush=True)
    except BaseException:
        print(f"failed; the servers' logs stay in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    write(a, rows, load0)


def write(a, rows, load0):
    f = lambda x: f"{x:.2f}"  # noqa: E731
    spread = lambda xs: " / ".join(f(x) for x in xs)  # noqa: E731
    lines = ["# Many users at once: concurrent inspects against a served app", "",
             f"Command: `python {' '.join(['bench/load_bench.py'] + sys.argv[1:])}` · "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {os.cpu_count()} cores · load average before "
             f"{load0[0]:.2f} · default model; per scenario and client kind {a.rounds} bursts of {a.clients} clients "
             "(own sessions) firing together, each uploading an example image with its own question (16 new tokens, "
             "greedy); percentiles over all requests of those bursts, then each burst's p95 (the spread). "
             "`rest`: Gradio's REST API, no downloads; `notebook`: gradio_client downloading the figures each answer "
             "names. CPU: the client process's own CPU seconds per burst, and the server's (with its render workers "
             "and the training process) over the same burst; here both share the machine's cores. The training run "
             "is GRPO on the bundled task (8 prompts × 8 rollouts, 12 new tokens) from the Train endpoint.", "",
             "| server | scenario | client | p50 s | p95 s | p95 of each burst s | max s | errors | client CPU s / burst "
             "| server CPU s / burst |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for scen, clients in (("idle", r["idle"]), ("training", r["train"]["clients"])):
            for kind in CLIENTS:
                c = clients[kind]
                lines.append(f"| {r['label']} | {scen} | {kind} | {f(c['p50'])} | {f(c['p95'])} | "
                             f"{spread(c['burst_p95'])} | {f(c['max'])} | {c['errors']} | {f(c['client_cpu_s'])} | "
                             f"{f(c['server_cpu_s'])} |")
    for r in rows:
        t = r["train"]
        lines += ["", f"{r['label']}: training s/step between → during bursts {f(t['step_before'])} → "
                  f"{f(t['step_during'])} ({t['steps_quiet']} / {t['steps_during']} steps), slowdown "
                  f"{t['slowdown']:.2f}×."]
    lines += ["", "Goals: 0 errors; with the light (`rest`) client p95 ≤ 5 s idle and ≤ 8 s with a training run "
              "active; the `notebook` client's figures are reported beside them (its downloads run on the same "
              "cores as the server here)."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
