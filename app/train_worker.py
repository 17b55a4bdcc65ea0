"""The child process of one training run (started by `app.training` from a fork server, or spawned where there is
none).

A run in a thread of the server shares the GIL with Gradio's event loop and every request's handler thread, and
a tiny model's training loop is mostly Python: a burst of requests slowed it 4×. In its own process the OS
shares the cores instead. This module must not import gradio (nor anything of the app that does): the child
imports only ral_core, so its start-up costs torch + transformers only.

Messages to the parent over `conn`, each a (kind, payload) tuple:
    ("loaded", probe)            the trainer exists; probe = {question, answer, boxes} of the snapshot image
    ("running", None)            the step-0 snapshot is written, training starts
    ("step", metrics)            one finished step (the metrics line also written to metrics.jsonl)
    ("end", {status, step, message})   done | cancelled | failed; step = the trainer's step at the end
Checkpoints and snapshots are read by the parent from the run's folder. No "end" means the process died.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import threading
from multiprocessing import connection, parent_process
from pathlib import Path

log = logging.getLogger("ral.app.train")


def _context():
    """Where forkserver exists: runs fork from a clean interpreter that imported the trainer once, not from the
    server (no copy of its threads, locks, models) — each run starts without re-importing torch + transformers +
    ral_core (≈ 3.5 s on 2 cores). Elsewhere spawn: a fresh interpreter per run."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # not the default '__main__': the server's main module imports gradio, which the child must not
    ctx.set_forkserver_preload(["app.train_worker", "ral_core.trainer"])
    return ctx


CONTEXT = _context()


def _watch(cancel, trainer_cancel: threading.Event) -> None:
    """Forward the parent's cancel to the trainer; exit at once if the server process is gone (no orphans)."""
    parent = parent_process()
    sentinel = [parent.sentinel] if parent is not None else []
    while True:
        if sentinel and connection.wait(sentinel, timeout=0.2):
            os._exit(3)  # nobody is left to read the results; the run's folder belongs to a dead server
        elif not sentinel:
            cancel.wait(0.2)
        if cancel.is_set():
            trainer_cancel.set()


def start(target, environ: dict, *args) -> None:
    """The child's entry point: the server's environment as it is now (a forkserver child inherits the fork
    server's, frozen when the first run started), then `target` (normally `main`)."""
    os.environ.clear()
    os.environ.update(environ)
    target(*args)


def main(cfg, reward_modules: list[str], conn, cancel, gone) -> None:
    """Train `cfg` and report to `conn`. `cancel`: stop at the next step boundary (a checkpoint is written);
    `gone`: the session ended, so no final snapshot (its folder is deleted once this process exits)."""
    if not logging.getLogger().handlers:  # stderr is the server's: tracebacks land in the server log
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s[pid %(process)d]: %(message)s")
    try:
        import torch
        if cfg.device != "cuda":
            torch.set_num_threads(max(1, cfg.threads))  # as the Trainer does on CPU; before the model loads
        from ral_core.errors import RALError
        from ral_core.trainer import Trainer
    except BaseException as e:  # noqa: BLE001 — the parent gets one line instead of a dead process
        log.exception("the training process could not start")
        conn.send(("end", {"status": "failed", "step": 0,
                           "message": f"unexpected error ({type(e).__name__}); the details are in the server log"}))
        return
    trainer = None
    try:
        for mod in reward_modules:  # rewards registered in the server process by modules of its own
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise RALError(f"cannot import the rewards' module '{mod}' in the training process: {e}") from None

        def report(_trainer, metrics):
            conn.send(("step", metrics))

        trainer = Trainer(cfg, callbacks=[report])  # the model loads here, in this process
        threading.Thread(target=_watch, args=(cancel, trainer.cancel), name="ral-train-watch", daemon=True).start()
        if cancel.is_set():
            trainer.cancel.set()
        try:
            p = trainer.probe_samples()[0]
            probe = {"question": p["question"], "answer": p["answer"], "boxes": [list(b) for b in p.get("boxes") or []]}
        except (RALError, IndexError, KeyError):
            probe = {}
        conn.send(("loaded", probe))
        if not trainer.cancel.is_set():
            trainer.snapshot()  # step 0: where the probe's attention starts
        conn.send(("running", None))
        res = trainer.train()
        if trainer.step > 0 and not gone.is_set() and \
                not (Path(cfg.output_dir) / "snapshots" / f"step-{trainer.step:05d}").is_dir():
            trainer.snapshot()  # always an after-picture, also for runs shorter than the snapshot interval
        end = {"status": res["status"], "step": trainer.step, "message": ""}
    except RALError as e:
        end = {"status": "failed", "step": trainer.step if trainer else 0, "message": str(e)}
    except Exception as e:  # noqa: BLE001 — the page gets one line, the log gets the trace
        log.exception("training run in process %d failed", os.getpid())
        end = {"status": "failed", "step": trainer.step if trainer else 0,
               "message": f"unexpected error ({type(e).__name__}); the details are in the server log"}
    conn.send(("end", end))
    conn.close()
