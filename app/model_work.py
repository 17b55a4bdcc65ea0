"""Model work of the tabs, each a plain function of names, images and numbers (on ZeroGPU it runs inside
`spaces.GPU`, arguments and result pickled; `progress` is then None). Every use of a model holds its served
record's lock (or goes through its inspect batcher) and runs under the request's time limit; a request's pixel
budget and listed name live on its own view of the adapter (`registry.Served.view`), never on the shared one."""
from __future__ import annotations

from ral_core.compare import compare
from ral_core.errors import RALError
from ral_core.inspection import inspect, inspect_explored
from ral_core.levers import lever_map
from ral_core.limits import deadline, request_seconds

from app import gpu, registry
from app.progress import Reporter, watch_model

COMPARE_PASSES = ("A answers", "B answers", "A scored on A's answer", "B scored on A's answer")


def served(name, spec, rep: Reporter | None) -> registry.Served:
    """The served model, reporting its load (and a hub download's progress) when it is not loaded yet."""
    if rep is not None and not registry.is_loaded(spec):
        rep.report("load", 0.0, f"loading the model '{name}'")
        s = registry.serve(name, spec, progress=rep.download(name))
        rep.report("load", 1.0, f"loaded the model '{name}'")
        return s
    return registry.serve(name, spec)


@gpu.gpu_task
def inspect_work(name, spec, img, q, opts, budget=None, progress=None):
    """One inspection. A sampled answer (its own seed), a request with its own pixel budget and ZeroGPU run on their
    own with the model's lock held; greedy ones go through the batcher, batched with whatever else is waiting."""
    s = served(name, spec, progress)
    n = opts["max_new_tokens"]
    with watch_model(s.adapter, progress, ("answer",), n):
        if opts["do_sample"] or gpu.on_zerogpu() or budget is not None:
            with deadline(request_seconds()), s.lock:
                adapter, note = s.view(name, budget)
                res = inspect(adapter, img, q, **opts)
            res.meta["pixel_budget"] = note
            return res
        return s.batcher().submit(img, q, n, seconds=request_seconds())


@gpu.gpu_task
def levers_work(name, spec, sample, strength, budget=None, progress=None):
    s = served(name, spec, progress)
    regions = 1 if sample.get("boxes") else 9  # ral_core.levers: the target box, or each ninth of the image
    with deadline(request_seconds()), s.lock, watch_model(s.adapter, progress, score_total=regions):
        adapter, _ = s.view(name, budget)
        if not sample["answer"]:  # a whitespace-only answer is still the model's answer: score it as generated
            sample = dict(sample, answer=adapter.tokenizer.decode(sample.pop("answer_ids"), skip_special_tokens=True))
        sample.pop("answer_ids", None)
        if not sample["answer"]:
            raise RALError("the model's answer is empty, so there is nothing to score; type an answer to score")
        return sample["answer"], lever_map(adapter, [sample], layers="all", strength=strength)


@gpu.gpu_task
def explored_work(name, spec, image, question, layers, sigma, seed, n, budget=None, progress=None):
    s = served(name, spec, progress)
    with deadline(request_seconds()), s.lock, \
            watch_model(s.adapter, progress, ("natural answer", "explored answer"), n):
        adapter, _ = s.view(name, budget)
        return inspect_explored(adapter, image, question, layers=layers, sigma=sigma, seed=seed, max_new_tokens=n)


@gpu.gpu_task
def compare_work(names, specs, img, q, opts, progress=None):
    sa = served(names[0], specs[0], progress)
    sb = served(names[1], specs[1], progress)  # the same model twice is one record; compare() only reads
    first, second = sorted((sa, sb), key=id)  # a fixed order, so two compares never deadlock (RLock: a is b is fine)
    with deadline(request_seconds()), first.lock, second.lock, \
            watch_model([sa.adapter, sb.adapter], progress, COMPARE_PASSES, opts["max_new_tokens"]):
        return compare(sa.view(names[0])[0], sb.view(names[1])[0], img, q, **opts)
