"""Serve concurrent inspections of one model together: requests that arrive while the model is busy are
answered in one batched greedy generation and one capture pass (`inspection.inspect_many`).

Each request keeps its own time limit: one whose limit passes while it waits is refused, and a batch runs
under the earliest limit of its members (generation stops there). A batch that fails is retried request by
request, so one bad request never costs the others their answer.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from ral_core.errors import RALError
from ral_core.limits import Deadline, check_question, deadline


class _Job:
    __slots__ = ("image", "question", "max_new_tokens", "layers", "deadline", "future")

    def __init__(self, image, question, max_new_tokens, layers, dl):
        self.image, self.question, self.deadline, self.future = image, question, dl, Future()
        self.max_new_tokens, self.layers = max_new_tokens, layers

    @property
    def key(self) -> tuple:
        """Requests batch together when they ask for the same generation length and layers."""
        return self.max_new_tokens, repr(self.layers)


class InspectBatcher:
    """One worker thread per model; `submit` blocks the caller until its result (or error) is ready.

    `lock` is held for each batch: other work on the same model (compare, levers, training a copy does not
    count) takes the same lock, so the model is never used by two threads at once."""

    def __init__(self, adapter, lock: threading.RLock | None = None, max_batch: int = 16, gather_s: float = 0.005):
        self.adapter, self.lock = adapter, lock or threading.RLock()
        self.max_batch, self.gather_s = max_batch, gather_s
        self._q: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ral-inspect-batcher", daemon=True)
        self._thread.start()
        self.batches: list[int] = []  # sizes of the batches run (for benchmarks and tests)

    def submit(self, image, question: str, max_new_tokens: int = 16, layers="all", seconds: float = 10.0):
        """The InspectionResult of a greedy inspection of (image, question), run with whatever else is waiting."""
        q = check_question(self.adapter, question)  # refuse bad questions here, never inside someone's batch
        job = _Job(image, q, int(max_new_tokens), layers, Deadline(seconds))
        self._q.put(job)
        try:
            return job.future.result(timeout=seconds + 30)  # the worker enforces the limit; this is a backstop
        except TimeoutError:
            raise RALError(f"the server did not answer within {seconds:g} s; try again in a moment") from None

    def close(self):
        """Stop the worker after the requests already queued (the model left the server's cache)."""
        self._q.put(None)

    def _top_up(self, jobs: list[_Job], until: float | None) -> None:
        """Add queued jobs to `jobs` up to max_batch, waiting until `until` (None: only what is queued now)."""
        while len(jobs) < self.max_batch:
            try:
                j = self._q.get_nowait() if until is None else self._q.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return
            if j is None:  # close(): leave the marker for the loop
                self._q.put(None)
                return
            jobs.append(j)

    def _run(self):
        from ral_core.inspection import inspect_many  # imports torch: the app starts before any model is asked for

        while True:
            first = self._q.get()
            if first is None:
                return
            jobs = [first]
            self._top_up(jobs, time.monotonic() + self.gather_s)
            with self.lock:
                self._top_up(jobs, None)  # everything queued while we waited for the lock joins this round
                groups: dict[tuple, list[_Job]] = {}
                for j in jobs:
                    if j.deadline.expired:
                        j.future.set_exception(RALError(
                            f"the server was busy for longer than the {j.deadline.seconds:g} s limit of one request;"
                            " try again in a moment"))
                    else:
                        groups.setdefault(j.key, []).append(j)
                for group in groups.values():
                    self._answer(inspect_many, group, group[0].max_new_tokens, group[0].layers)
                    self.batches.append(len(group))

    def _answer(self, inspect_many, group, n, layers):
        try:
            with deadline(min(j.deadline.remaining() for j in group) or 1e-3):
                results = inspect_many(self.adapter, [j.image for j in group], [j.question for j in group],
                                       max_new_tokens=n, layers=layers)
        except Exception as e:  # noqa: BLE001 — retried one by one, so each request gets its own outcome
            if len(group) == 1:
                group[0].future.set_exception(e)
                return
            for j in group:
                self._answer(inspect_many, [j], n, layers)
            return
        for j, r in zip(group, results):
            j.future.set_result(r)

