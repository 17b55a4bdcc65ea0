"""Chunked runs (ral_core/chunked.py) through the ZeroGPU stand-in (tests/spaces_standin/spaces.py: a forked worker
per call, arguments and results pickled, nothing copied back): a run split into calls of k = 1, 2, 3 steps equals
the same run unsplit, bit for bit; the main process never touches CUDA; the limits end a run with one clear line
and keep the last finished call's checkpoint."""
import importlib.util
import math
import threading
from pathlib import Path

import pytest
import torch

from ral_core import chunked
from ral_core.chunked import ChunkJob, ChunkLimits, RunState, declared_seconds, run_chunk, run_chunked
from ral_core.config import TrainConfig
from ral_core.errors import RALError

STANDIN = Path(__file__).resolve().parent / "spaces_standin" / "spaces.py"
TIMING = {"step_time", "rollout_time"}


@pytest.fixture()
def spaces():
    spec = importlib.util.spec_from_file_location("spaces_standin_for_tests", STANDIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    mod.reset()


def _cfg(model_dir, out, steps=3, **kw) -> TrainConfig:
    """A RAL run of the embedded default model whose groups differ in reward (so every step here updates)."""
    base = dict(model=model_dir, output_dir=str(out), device="cpu", threads=1, steps=steps, prompts_per_step=3,
                group_size=6, task_kinds=["cell", "row", "where"], temperature=1.5, max_new_tokens=8, epochs=2,
                minibatch_size=9, lr=5e-3, lambda_attn=1.0, seed=0, log_tensorboard=False, snapshot_every=0,
                save_every=0, attn_metrics_every=1, keep_checkpoints=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def _unchunked(cfg: TrainConfig):
    from ral_core.trainer import Trainer
    t = Trainer(cfg)
    t.train()
    return chunked.capture_state(t)


def _chunked(spaces, cfg: TrainConfig, k: int, **kw):
    job = ChunkJob(cfg.to_dict(), call_ceiling_s=120)
    call = spaces.GPU(duration=declared_seconds)(run_chunk)
    events = list(run_chunked(job, call, ChunkLimits(chunk_steps=k, run_seconds=10_000), **kw))
    return events


def _same(a: RunState, b: RunState):
    assert a.step == b.step and a.data_position == b.data_position
    assert set(a.trainable) == set(b.trainable)
    for n in a.trainable:
        assert torch.equal(a.trainable[n], b.trainable[n]), n
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    assert set(sa) == set(sb)
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert a.scheduler == b.scheduler
    assert torch.equal(a.rng["torch"], b.rng["torch"]) and a.rng["python"] == b.rng["python"]
    strip = lambda h: [{k: v for k, v in m.items() if k not in TIMING} for m in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)


@pytest.fixture(scope="module")
def model_dir():
    return "default"


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    cfg = _cfg(model_dir, tmp_path_factory.mktemp("unchunked") / "run")
    return cfg, _unchunked(cfg)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chunked_equals_unchunked(reference, spaces, model_dir, tmp_path, k):
    cfg0, ref = reference
    cfg = _cfg(model_dir, tmp_path / "run")
    events = _chunked(spaces, cfg, k)
    assert [e.kind for e in events] == ["chunk"] * math.ceil(3 / k) + ["end"]
    assert events[-1].status == "done" and len(spaces.CALLS) == math.ceil(3 / k)
    assert all(name == "run_chunk" for name, _ in spaces.CALLS)
    _same(events[-1].state, ref)
    # not vacuous: the steps after the first call's boundary update the weights, with the attention term acting
    assert all(m["grad_norm"] > 0 and m["loss_ral_attn"] != 0 for m in ref.history[1:])
    # the checkpoint the last call wrote holds the same weights as the unchunked run's
    from safetensors.torch import load_file
    a = load_file(str(Path(events[-1].checkpoint) / "model.safetensors"))
    b = load_file(str(Path(cfg0.output_dir) / "checkpoints" / "step-00003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_lora_chunked_equals_unchunked(spaces, model_dir, tmp_path):
    """LoRA adapters (with dropout: an RNG consumer inside the update) carried between calls."""
    ref = _unchunked(_cfg(model_dir, tmp_path / "ref", steps=2, lora_r=4, lora_dropout=0.1, lr=1e-2))
    events = _chunked(spaces, _cfg(model_dir, tmp_path / "run", steps=2, lora_r=4, lora_dropout=0.1, lr=1e-2), 1)
    assert len(spaces.CALLS) == 2 and all("lora_" in n for n in ref.trainable)
    _same(events[-1].state, ref)


def test_main_process_never_touches_cuda(spaces, model_dir, tmp_path, monkeypatch):
    """torch.cuda is forbidden in this process (the forked worker gets it back): the driver only moves CPU data."""
    touched = []

    def forbidden(name):
        def f(*a, **k):
            touched.append(name)
            raise AssertionError(f"torch.cuda.{name} called in the main process")
        return f

    for name in ("is_available", "init", "_lazy_init", "device_count", "get_rng_state_all", "current_device",
                 "set_rng_state_all"):
        spaces.CUDA_RESTORE[name] = getattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    events = _chunked(spaces, _cfg(model_dir, tmp_path / "run", steps=2), 1)
    assert events[-1].status == "done" and events[-1].step == 2 and not touched


def test_cancel_between_calls_keeps_the_last_checkpoint(spaces, model_dir, tmp_path):
    cancel = threading.Event()
    job = ChunkJob(_cfg(model_dir, tmp_path / "run", steps=4).to_dict())
    seen = []
    for ev in run_chunked(job, spaces.GPU(duration=declared_seconds)(run_chunk), ChunkLimits(chunk_steps=2),
                          cancel=cancel):
        seen.append(ev)
        cancel.set()  # pressed while the first call ran: acts before the second
    assert [e.kind for e in seen] == ["chunk", "end"] and seen[-1].status == "cancelled"
    assert seen[-1].message == "cancelled after step 2; the checkpoint of step 2 is kept"
    assert Path(seen[-1].checkpoint).name == "step-00002" and (Path(seen[-1].checkpoint) / "model.safetensors").is_file()
    assert len(spaces.CALLS) == 1


def test_platform_abort_ends_with_one_line_and_keeps_the_checkpoint(spaces, model_dir, tmp_path):
    spaces.ABORT_CALLS.add(2)
    job = ChunkJob(_cfg(model_dir, tmp_path / "run", steps=4).to_dict())
    events = list(run_chunked(job, spaces.GPU(duration=declared_seconds)(run_chunk), ChunkLimits(chunk_steps=2)))
    end = events[-1]
    assert end.status == "stopped" and end.step == 2 and "\n" not in end.message
    assert end.message.startswith("the platform aborted GPU call 2 after its declared ")
    assert end.message.endswith("; the checkpoint of step 2 is kept") and Path(end.checkpoint).name == "step-00002"
    from ral_core.trainer import Trainer  # the kept checkpoint resumes to the state the last finished call handed back
    t = Trainer(TrainConfig(**job.config))
    t.load_checkpoint(Path(end.checkpoint))
    assert t.step == 2
    assert all(torch.equal(p.detach(), end.state.trainable[n]) for n, p in t.model.named_parameters() if p.requires_grad)


def test_exhausted_quota_ends_the_run(spaces, model_dir, tmp_path):
    spaces.QUOTA_LEFT = 130  # the first call declares the 120 s ceiling; the second finds 10 s left
    job = ChunkJob(_cfg(model_dir, tmp_path / "run", steps=4).to_dict())
    events = list(run_chunked(job, spaces.GPU(duration=declared_seconds)(run_chunk), ChunkLimits(chunk_steps=2)))
    end = events[-1]
    assert end.status == "stopped" and end.step == 2
    assert end.message.startswith("the GPU quota of this account is used up (You have exceeded your GPU quota")
    assert end.message.endswith("; the checkpoint of step 2 is kept")


def test_run_budget_and_step_cap(spaces, model_dir, tmp_path):
    job = ChunkJob(_cfg(model_dir, tmp_path / "run", steps=4).to_dict())
    call = spaces.GPU(duration=declared_seconds)(run_chunk)
    events = list(run_chunked(job, call, ChunkLimits(chunk_steps=2, run_seconds=125)))
    end = events[-1]
    assert end.status == "stopped" and end.step >= 2 and "used its GPU time" in end.message
    assert end.gpu_seconds <= 125 and Path(end.checkpoint).is_dir()
    with pytest.raises(RALError, match="at most 40 steps .this one has 41."):
        next(run_chunked(ChunkJob({**job.config, "steps": 41}), call, ChunkLimits()))
    assert ChunkLimits.from_env() == ChunkLimits()


def test_declared_duration_follows_the_measured_step_time():
    job = ChunkJob({"steps": 10}, call_ceiling_s=120)
    assert declared_seconds(job, None, 4) == 120  # nothing measured yet: the ceiling
    st = RunState(2, 4, {}, {}, {}, {}, [], setup_s=2.0, step_s=3.0)
    assert declared_seconds(job, st, 4) == math.ceil((2 + 4 * 3) * 1.3 + 10)
    assert chunked.steps_that_fit(job, st, 100) == int(((120 - 10) / 1.3 - 2) // 3)
    assert declared_seconds(job, RunState(2, 4, {}, {}, {}, {}, [], setup_s=2.0, step_s=300.0), 1) == 120


def test_only_cpu_picklable_values_cross(spaces):
    with pytest.raises(RALError, match="tensor on 'meta'"):
        chunked.check_crossing({"w": torch.empty(2, device="meta")})
    with pytest.raises(RALError, match="cannot cross"):
        chunked.check_crossing({"f": lambda: 1})
    echo = spaces.GPU(duration=5)(lambda x: x)
    with pytest.raises(TypeError, match="tensor on meta"):
        echo([torch.empty(1, device="meta")])
    with pytest.raises(Exception, match="pickle|lambda"):
        echo(lambda: 1)
    make = spaces.GPU(duration=5)(_returns_meta)
    with pytest.raises(TypeError, match="the result holds a tensor on meta"):
        make()
    assert torch.equal(spaces.GPU(duration=5)(_double)(torch.ones(2)), torch.full((2,), 2.0))


def _returns_meta():
    return {"w": torch.empty(1, device="meta")}


def _double(x):
    return x * 2


def test_a_state_too_large_to_carry_trains_lora_or_is_refused(spaces, model_dir, tmp_path):
    """Over max_state_mb the first call switches to LoRA (auto_lora) and every later call keeps it; without
    auto_lora the run is refused before its first step."""
    cfg = _cfg(model_dir, tmp_path / "run", steps=2)
    call = spaces.GPU(duration=declared_seconds)(run_chunk)
    job = ChunkJob(cfg.to_dict(), max_state_mb=1, auto_lora=4)  # the default model's full state is ≈ 7 MB
    events = list(run_chunked(job, call, ChunkLimits(chunk_steps=1)))
    end = events[-1]
    assert end.status == "done" and end.calls == 2 and end.state.overrides == {"lora_r": 4}
    assert end.state.trainable and all("lora_" in n for n in end.state.trainable)
    assert (Path(end.checkpoint) / "adapter_model.safetensors").is_file()
    assert "LoRA r=4" in (tmp_path / "run" / "run.log").read_text()
    refused = list(run_chunked(ChunkJob(_cfg(model_dir, tmp_path / "r2", steps=2).to_dict(), max_state_mb=1), call,
                               ChunkLimits(chunk_steps=1)))
    assert refused[-1].status == "failed" and refused[-1].step == 0
    assert refused[-1].message.startswith("this run would carry 7 MB of weights and optimizer state between GPU "
                                          "calls (at most 1 MB here): train it with LoRA (lora_r=8)")
    assert refused[-1].message.endswith("; nothing was trained") and "\n" not in refused[-1].message

