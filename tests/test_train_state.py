"""Trainer state without pickle: exact round trip of optimizer / scheduler / RNG streams, bit-identical resume,
a planted pickle is refused unopened, stale `.tmp-step-*` folders of killed writers are removed."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from ral_core.config import build_config
from ral_core.errors import RALError
from ral_core.train_state import (LEGACY_PICKLE, STATE_JSON, STATE_TENSORS, load_state, remove_stale_tmp,
                                  save_state)
from ral_core.trainer import Trainer

BASE = ["steps=3", "prompts_per_step=2", "group_size=4", "minibatch_size=4", "epochs=2", "max_new_tokens=4",
        "lr=5e-3", "temperature=1.5", "schedule=cosine", "warmup_steps=1", "save_every=1", "attn_metrics_every=0"]


def _cfg(tmp, name, model, *extra):
    return build_config(None, BASE + [f"output_dir={tmp / name}", f"model={model}"] + list(extra))


def _params(t):
    return {n: p.detach().clone() for n, p in t.acc.unwrap_model(t.model).named_parameters()}


def _opt_sched(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1 / (1 + u))
    return net, opt, sched


def _assert_same(a, b):
    """Exactly equal nested state: tensors by value and dtype, containers by type."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_of_optimizer_scheduler_and_rng_is_exact(tmp_path):
    net, opt, sched = _opt_sched(0)
    for _ in range(3):
        net(torch.randn(2, 5)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    random.random()
    np.random.randn()  # leaves a cached gaussian in numpy's state (has_gauss = 1)
    torch.rand(3)
    save_state(tmp_path, 7, opt, sched, history_len=5)
    draws = (random.random(), np.random.randn(3).tolist(), torch.rand(4))
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    _, opt2, sched2 = _opt_sched(1)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert load_state(tmp_path, opt2, sched2) == {"step": 7, "history_len": 5}
    _assert_same(opt2.state_dict(), saved_opt)
    _assert_same(sched2.state_dict(), saved_sched)
    assert sched2.get_last_lr() == sched.get_last_lr()
    again = (random.random(), np.random.randn(3).tolist(), torch.rand(4))
    assert again[:2] == draws[:2] and torch.equal(again[2], draws[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]


class _Plant:
    """Unpickling this creates a marker file: stands for any code an attacker's pickle would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(folder, marker):
    torch.save({"step": 1, "payload": _Plant(marker)}, folder / LEGACY_PICKLE)


def test_planted_pickle_is_refused_unopened(tmp_path):
    _, opt, sched = _opt_sched(0)
    ck, marker = tmp_path / "ck", tmp_path / "pwned"
    ck.mkdir()
    _plant_pickle(ck, marker)
    with pytest.raises(RALError, match=r"pickle \(trainer_state.pt\).*refused"):
        load_state(ck, opt, sched)
    assert not marker.exists()
    torch.load(ck / LEGACY_PICKLE, weights_only=False)  # the plant is live: the old loader ran it
    assert marker.exists()


def test_resume_of_a_planted_pickle_checkpoint_is_refused(tmp_path, tiny_model_dir):
    """The old layout as another user could hand it over: valid weights, the state as a code-running pickle."""
    t = Trainer(_cfg(tmp_path, "run", tiny_model_dir, "steps=1"))
    t.train()
    ck = t.latest_checkpoint()
    for name in (STATE_JSON, STATE_TENSORS):
        (ck / name).unlink()
    marker = tmp_path / "pwned"
    _plant_pickle(ck, marker)
    with pytest.raises(RALError, match="refused"):
        Trainer(_cfg(tmp_path, "run", tiny_model_dir, "steps=2")).train(resume=True)
    assert not marker.exists()


def test_resume_is_bit_identical_and_reads_no_pickle(tmp_path, tiny_model_dir, monkeypatch):
    full = Trainer(_cfg(tmp_path, "full", tiny_model_dir))
    full.train()

    def stop_after_one(trainer, m):
        if trainer.step == 1:
            trainer.cancel.set()
    part = Trainer(_cfg(tmp_path, "part", tiny_model_dir), callbacks=[stop_after_one])
    assert part.train()["step"] == 1
    ck = part.latest_checkpoint()
    assert (ck / STATE_JSON).is_file() and not list(ck.glob("*.pt")) and not list(ck.glob("*.bin"))

    def no_pickle(*a, **k):
        raise AssertionError("resume called torch.load")
    monkeypatch.setattr(torch, "load", no_pickle)
    resumed = Trainer(_cfg(tmp_path, "part", tiny_model_dir))
    resumed.train(resume=True)
    a, b = ([{k: v for k, v in json.loads(x).items() if not k.endswith("_time")}
             for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "part"))
    assert [m["step"] for m in b] == [1, 2, 3] and a == b
    fa, fb = _params(full), _params(resumed)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert resumed.sched.get_last_lr() == full.sched.get_last_lr()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_tmp_folders_of_killed_writers_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    dead = root / f".tmp-step-00003-{_dead_pid()}"
    live = root / f".tmp-step-00004-{os.getppid()}"  # a live writer: must be left alone
    mine = root / f".tmp-step-00005-{os.getpid()}"   # this process's write in flight
    old_mine = root / f".tmp-step-00002-{os.getpid()}"  # same pid, written before this process started
    for d in (dead, live, mine, old_mine):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    os.utime(old_mine, (0, 0))
    assert sorted(remove_stale_tmp(root)) == sorted([dead, old_mine])
    assert live.is_dir() and mine.is_dir() and not dead.exists() and not old_mine.exists()
    assert remove_stale_tmp(tmp_path / "missing") == []


def test_a_killed_checkpoint_write_does_not_block_the_next_run(tmp_path, tiny_model_dir):
    """kill -9 during the first checkpoint write: only a .tmp-step-* folder is left; the next run starts."""
    stale = tmp_path / "run" / "checkpoints" / f".tmp-step-00001-{_dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    res = Trainer(_cfg(tmp_path, "run", tiny_model_dir, "steps=1")).train()
    assert res["status"] == "done" and not stale.exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-00001"]
