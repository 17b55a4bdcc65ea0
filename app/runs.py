"""The server-wide FIFO queue of training runs (at most RAL_MAX_RUNS at once, default 1), each run in its own child
process (`app.train_worker`, calling `ral_core.trainer.Trainer`). Gradio-free: the Train tab (app.training) reads it.

A child process, not a thread: a tiny model's training loop is Python-bound, and in a thread it shared the GIL
with Gradio's event loop and every request's handler (20 concurrent inspects slowed it 4×); a process gets the
cores from the OS. A thread per run here reads the child's messages (steps, metrics, status) into the `Run` the
page polls, and registers the checkpoint when the child is done. A child that dies without a word becomes a
failed run that keeps its last periodic checkpoint; children are daemons and leave with the server.

A run lives in the session's private `runs/<n>/` folder (config, metrics, snapshots, the trainer's own
checkpoints, an uploaded data set). When it ends (done, or cancelled after ≥ 1 step) its last checkpoint is
copied — weights, tokenizer, processor, no optimizer state — into the session's `checkpoints/<name>/`, where it
is listed as the model `session: <name>` in Inspect, Compare and Train.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

from ral_core import settings
from ral_core.errors import RALError

from app import gpu, sessions, train_worker

log = logging.getLogger("ral.app.train")
ACTIVE_STATES = ("queued", "loading", "running")


def max_runs() -> int:
    try:
        return settings.get("RAL_MAX_RUNS")
    except ValueError:
        return 1


# ---- one run -------------------------------------------------------------------------------------------
_MP = train_worker.CONTEXT
CRASH = "the training process stopped unexpectedly (exit code {code})"


class RunState(NamedTuple):
    status: str
    message: str
    step: int
    checkpoint: str | None
    loaded: bool
    stopping: bool           # cancel asked for: stops after the current step
    started_at: float | None
    ended_at: float | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES


class Run:
    _ids = itertools.count(1)

    def __init__(self, session_hash: str, cfg, name: str, algorithm: str, run_dir: Path, data_note: str):
        self.id = next(self._ids)
        self.session_hash, self.cfg, self.name, self.algorithm = session_hash, cfg, name, algorithm
        self.dir, self.data_note = run_dir, data_note
        self.status, self.message = "queued", ""
        self.cancel = threading.Event()
        self._signals = None                 # (cancel, gone) multiprocessing Events while the child lives
        self.session_ended = False
        self.checkpoint: str | None = None   # registered name once copied into checkpoints/
        self.announced = False               # model lists refreshed after the checkpoint appeared
        self.probe: dict = {}
        self.queued_at, self.started_at, self.ended_at = time.time(), None, None
        self.rendered: dict[str, tuple] = {}  # figure kind → (key, png path)
        self.render_lock = threading.Lock()  # overlapping polls of one session render one at a time
        self.thread: threading.Thread | None = None  # the parent's reader: progress in, clean-up after the child
        self.process = None                  # the child process that trains
        self.pid: int | None = None
        self.loaded = False                  # the trainer exists (model loaded, snapshots may appear)
        self._step = 0
        self._history: list[dict] = []       # metrics of every step, as the child reports them
        self.zerogpu = None                  # ZeroGPU: the starting request's context; trains as GPU calls instead
        self.prepare = None                  # work left for when the run starts (unpacking its data set), or None
        self.data_bytes = 0                  # what `prepare` will unpack (counted against RAL_MAX_QUEUED_MB)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    def snapshot(self) -> "RunState":
        """The run as one page should show it, read once. The status is read first: the message, step and checkpoint
        that go with an ended run are written before its status, so a page never pairs "failed" with no reason."""
        status = self.status
        return RunState(status, self.message, self._step, self.checkpoint, self.loaded, self.cancel.is_set(),
                        self.started_at, self.ended_at)

    @property
    def step(self) -> int:
        return self._step

    def history(self) -> list[dict]:
        return list(self._history)

    def latest_checkpoint(self) -> Path | None:
        """The trainer's newest complete checkpoint, read from disk (the child may be gone)."""
        f = Path(self.cfg.output_dir) / "checkpoints" / "latest"
        try:
            return f.parent / f.read_text().strip()
        except OSError:
            return None


class RunQueue:
    """Server-wide FIFO of training runs with a cap on how many train at once."""

    def __init__(self):
        self.lock = threading.RLock()
        self.waiting: deque[Run] = deque()
        self.running: list[Run] = []
        self.latest: dict[str, Run] = {}   # session hash → its newest run
        self.target = train_worker.main    # what the child runs (module-level: pickled by reference)

    def for_session(self, session_hash: str) -> Run | None:
        return self.latest.get(session_hash)

    def starts_now(self) -> bool:
        """Whether a run submitted now would start at once (nothing waiting, a free slot)."""
        with self.lock:
            return not self.waiting and len(self.running) < max_runs()

    def check_room(self, data_bytes: int = 0) -> None:
        """RALError "queue full" when one more waiting run (holding `data_bytes` to unpack) would pass the bounds."""
        if self.starts_now():
            return
        with self.lock:
            n, held = len(self.waiting), sum(r.data_bytes for r in self.waiting)
        cap_n, cap_mb = settings.get("RAL_MAX_QUEUED"), settings.get("RAL_MAX_QUEUED_MB")
        if n >= cap_n:
            raise RALError(f"the training queue is full ({n} run{'s' if n != 1 else ''} waiting, the most this server "
                           "holds); try again when one has started")
        if held + data_bytes > cap_mb * 2**20:
            raise RALError(f"the training queue is full: the waiting runs' data sets take {held / 2**20:.0f} MB "
                           f"unpacked and yours {data_bytes / 2**20:.1f} MB, over the {cap_mb:g} MB this server holds "
                           "for waiting runs; try again when one has started, or upload a smaller data set")

    def submit(self, run: Run) -> None:
        with self.lock:
            cur = self.latest.get(run.session_hash)
            if cur is not None and cur.active:
                raise RALError("this session already has a training run; cancel it or wait until it ends")
            self.check_room(run.data_bytes if run.prepare is not None else 0)
            self.latest[run.session_hash] = run
            self.waiting.append(run)
            self._pump()

    def position(self, run: Run) -> int:
        """1-based place in the waiting line (0 when not waiting)."""
        with self.lock:
            try:
                return list(self.waiting).index(run) + 1
            except ValueError:
                return 0

    def cancel(self, run: Run) -> None:
        with self.lock:
            run.cancel.set()
            if run._signals:
                run._signals[0].set()  # the child stops at the next step boundary
            if run in self.waiting:
                self.waiting.remove(run)
                run.message = "cancelled while waiting in the queue; nothing was trained"
                run.status, run.ended_at = "cancelled", time.time()

    def end_session(self, session_hash: str) -> bool:
        """Cancel the session's run; True when its process is still finishing (the reader deletes the folder
        once the child has exited, so nothing writes into a deleted folder)."""
        with self.lock:
            run = self.latest.pop(session_hash, None)
            if run is None:
                return False
            run.session_ended = True
            if run._signals:
                run._signals[1].set()  # no final snapshot: the folder is deleted once the child exits
            self.cancel(run)
            return run in self.running

    def _pump(self) -> None:
        with self.lock:
            while self.waiting and len(self.running) < max_runs():
                run = self.waiting.popleft()
                self.running.append(run)
                run.status, run.started_at = "loading", time.time()  # includes the child's start-up (imports)
                run.thread = threading.Thread(target=self._work, args=(run,), name=f"ral-train-{run.id}", daemon=True)
                run.thread.start()

    def _work(self, run: Run) -> None:
        """Start the child, turn its messages into the run's state, then register its checkpoint."""
        end = None
        try:
            if run.prepare is not None:  # unpacked now that the run starts, never while it waits
                try:
                    run.prepare()
                except RALError as e:
                    run.message, run.status = str(e), "failed"
                    return
                finally:
                    run.prepare, run.data_bytes = None, 0
            end = gpu.follow_chunked(run) if run.zerogpu is not None else self._follow(run)
            # the status last: a poll that sees the run over also sees its checkpoint and the whole message
            if end is None:  # killed, segfault, out of memory: no last word from the child
                run.message = CRASH.format(code=run.process.exitcode)
                self._keep_last_good(run, crashed=True)
                run.status = "failed"
            elif end["status"] == "failed":
                run.message = end["message"]
                self._keep_last_good(run)
                run.status = "failed"
            else:
                if run.step > 0 and not run.session_ended:
                    run.checkpoint = self._register(run, run.latest_checkpoint())
                if end["status"] == "cancelled":
                    run.message = (f"cancelled after step {run.step}" if run.step else
                                   "cancelled before the first step; nothing was trained")
                run.status = end["status"]
        except Exception as e:  # noqa: BLE001 — the page gets one line, the log gets the trace
            log.exception("training run %s failed", run.id)
            run.message = f"unexpected error ({type(e).__name__}); the details are in the server log"
            run.status = "failed"
        finally:
            run.ended_at, run._signals = time.time(), None
            with self.lock:
                if run in self.running:
                    self.running.remove(run)
                self._pump()
            if run.session_ended:
                sessions.cleanup(run.session_hash)

    def _follow(self, run: Run) -> dict | None:
        """Run the child to its end; its "end" message, or None when it died without one."""
        # Events only while the child lives: each holds named semaphores, freed when the Events are dropped
        run._signals = cancel, gone = _MP.Event(), _MP.Event()
        if run.cancel.is_set():  # set before the Events existed (QUEUE.cancel sets both once they do)
            cancel.set()
        if run.session_ended:
            gone.set()
        recv, send = _MP.Pipe(duplex=False)
        proc = _MP.Process(target=train_worker.start, name=f"ral-train-{run.id}", daemon=True,  # ends with the server
                           args=(self.target, dict(os.environ), run.cfg, _reward_modules(run.cfg), send, cancel, gone))
        try:
            proc.start()
        except BaseException:
            recv.close()
            raise
        finally:
            send.close()  # the child holds the only writer: its exit ends recv with EOFError
        run.process, run.pid = proc, proc.pid
        end = None
        try:
            while end is None:
                try:
                    kind, payload = recv.recv()
                except (EOFError, OSError):
                    break
                if kind == "step":
                    run._history.append(payload)
                    run._step = int(payload["step"])
                elif kind == "loaded":
                    run.probe, run.loaded = payload, True
                elif kind == "running":
                    run.status = "running"
                elif kind == "end":
                    end = payload
                    # a failed step is rolled back to the last checkpoint: keep the numbers up to there
                    run._step = int(end["step"])
                    run._history = [m for m in run._history if m.get("step", 0) <= run._step]
        finally:
            recv.close()
            proc.join()
        if end is not None and proc.exitcode:
            log.warning("training process of run %s exited with code %s after its last message", run.id,
                        proc.exitcode)
        return end

    def _keep_last_good(self, run: Run, crashed: bool = False) -> None:
        """A failed run keeps the work done so far: its last periodic checkpoint is registered like a final one."""
        if run.session_ended or run.checkpoint:
            return
        ck = run.latest_checkpoint()
        try:
            run.checkpoint = self._register(run, ck)
        except OSError:
            log.exception("could not keep the last checkpoint of run %s", run.id)
            return
        step = (ck.name.split("-")[-1].lstrip("0") or "0") if run.checkpoint else ""
        if crashed:
            run.message += (f"; its last checkpoint (step {step}) is kept" if run.checkpoint else
                            "; it had not written a checkpoint yet, so nothing was kept")
        elif run.checkpoint:
            run.message += f" — the last good checkpoint (step {step}) is kept"

    @staticmethod
    def _register(run: Run, ck: Path | None) -> str | None:
        """Copy the final checkpoint (no optimizer state) into the session's checkpoints/<name>/."""
        if ck is None or not ((ck / "config.json").is_file() or (ck / "adapter_config.json").is_file()):
            return None
        base = sessions.checkpoints_dir(run.session_hash)
        tmp = base / f".tmp-{run.name}-{run.id}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ck, tmp, ignore=shutil.ignore_patterns("trainer_state.*"))
        final = base / run.name
        if final.exists():  # a name taken meanwhile: keep both
            final = base / f"{run.name}-{run.id}"
        os.replace(tmp, final)
        return final.name


def _reward_modules(cfg) -> list[str]:
    """Modules that registered the config's rewards in this process (not ral_core's own): the child imports
    them, so rewards added by the server's own code work there too."""
    from ral_core.rewards import REWARDS

    mods = {getattr(REWARDS.get(name), "__module__", None) for name in cfg.reward_weights}
    return sorted(m for m in mods if m and m != "__main__" and not m.startswith("ral_core"))


QUEUE = RunQueue()


def _busy(key: str) -> bool:
    """Whether the session with this folder key has a waiting or running run (its folder must not be swept)."""
    with QUEUE.lock:
        runs = list(QUEUE.running) + list(QUEUE.waiting)
    return any(sessions.session_key(r.session_hash) == key for r in runs)


sessions.set_busy_check(_busy)
