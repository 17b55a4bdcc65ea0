"""Mixed precision: a bf16 checkpoint trains with fp32 master weights and fp32 AdamW state, saves bf16
weights plus the masters, resumes exactly, and learns like an fp32 run; LoRA adapters are fp32."""
import json

import numpy as np
import pytest
import torch

from ral_core.config import build_config
from ral_core.errors import RALError
from ral_core.rewards import reward
from ral_core.train_state import MASTER_WEIGHTS, resolve_precision
from ral_core.trainer import Trainer

BASE = ["prompts_per_step=2", "group_size=4", "minibatch_size=8", "epochs=1", "max_new_tokens=4", "lr=5e-5",
        "temperature=1.5", "max_grad_norm=0", "reward_weights={test_precision_parity: 1.0}"]


@reward("test_precision_parity")
def _parity(completion, sample):
    """A coin flip per distinct completion, so the advantages (and gradients) of an untrained model are non-zero."""
    return float(sum(map(ord, completion)) % 2)


def _save(adapter, d):
    for part in (adapter.model, adapter.tokenizer, adapter.image_processor):
        part.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny Qwen2-VL (weights N(0, 0.02²), transformers' init) saved in bf16, as real checkpoints are."""
    from ral_core.builders.tiny import tiny_qwen2_vl
    a = tiny_qwen2_vl(layers=2)
    a.model.to(torch.bfloat16)
    return _save(a, tmp_path_factory.mktemp("bf16_model"))


def _cfg(tmp, name, model, *extra):
    return build_config(None, BASE + [f"output_dir={tmp / name}", f"model={model}"] + list(extra))


def _model(t):
    return t.acc.unwrap_model(t.model)


def _masters(t):
    return {n: p.detach().clone() for n, p in _model(t).named_parameters() if p.requires_grad}


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (fp32 result)."""
    x = x.to(dtype).abs().float()
    return (torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float() - x)


def test_one_step_at_5e_5_moves_every_weight_with_a_gradient(tmp_path, bf16_dir):
    t = Trainer(_cfg(tmp_path, "one", bf16_dir, "steps=1"))
    assert t.precision.mode == "fp32" and t.precision.storage == torch.bfloat16  # auto on the CPU
    names = {id(p): n for n, p in _model(t).named_parameters()}
    assert all(p.dtype == torch.float32 for p in _model(t).parameters())
    before, grads = _masters(t), {}
    t.opt.optimizer.register_step_pre_hook(
        lambda opt, *_: grads.update({names[id(p)]: p.grad.detach().clone() for g in opt.param_groups
                                      for p in g["params"] if p.grad is not None}))
    t.train()
    assert t.history[0]["updates"] == 1 and len(grads) == len(before)
    after = _masters(t)
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
               for s in t.opt.optimizer.state.values())

    # fp32 masters: AdamW's first step moves each weight by lr·g/(|g| + eps), which fp32 can represent at every
    # weight unless |g| is so tiny that the step is below the weight's fp32 spacing: count those apart.
    n_grad = n_moved = n_tiny = 0
    for n, g in grads.items():
        step = 5e-5 * g.abs() / (g.abs() + 1e-8)
        nz, representable = g != 0, step > _ulp(before[n], torch.float32)
        moved = after[n] != before[n]
        assert torch.equal(moved & nz & representable, nz & representable), n
        assert not (moved & ~nz).any(), n  # no gradient, no weight decay: no change
        n_grad, n_moved, n_tiny = n_grad + int(nz.sum()), n_moved + int((moved & nz).sum()), n_tiny + int(
            (nz & ~representable).sum())
    assert n_grad > 10_000 and n_tiny <= 1e-3 * n_grad, (n_grad, n_tiny)
    assert n_moved >= n_grad - n_tiny

    # the same step in pure bf16 (what the trainer did before: bf16 weights and AdamW state) loses most updates
    pure = {n: before[n].to(torch.bfloat16).requires_grad_() for n in grads}
    opt = torch.optim.AdamW(list(pure.values()), lr=5e-5, weight_decay=0.0)
    for n, p in pure.items():
        p.grad = grads[n].to(torch.bfloat16)
    opt.step()
    moved_pure = sum(int(((pure[n].detach().float() != before[n]) & (grads[n] != 0)).sum()) for n in grads)
    assert moved_pure < 0.9 * n_grad, moved_pure / n_grad  # the check above can fail

    # the checkpoint: bf16 weights that are the masters rounded to bf16, and the masters themselves
    from safetensors.torch import load_file

    from ral_core.models import load_adapter
    ck = t.latest_checkpoint()
    assert json.loads((ck / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(str(ck / "model.safetensors")).values()} == {torch.bfloat16}
    saved = dict(load_adapter(ck).model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in saved.values())
    masters = load_file(str(ck / MASTER_WEIGHTS))
    n_coarse = 0
    for n in grads:
        assert torch.equal(masters[n], after[n])
        assert torch.equal(saved[n], after[n].to(torch.bfloat16)), n
        # a change of at least one bf16 spacing must show in the bf16 checkpoint (smaller ones round back: only the
        # masters keep them, until they add up)
        coarse = (after[n] - before[n]).abs() >= _ulp(before[n], torch.bfloat16)
        assert (saved[n].float() != before[n])[coarse].all(), n
        n_coarse += int(coarse.sum())
    assert n_coarse > 100  # weights near zero, where bf16 is fine enough for a 5e-5 step


def _curve(tmp, name, model, teacher, precision, pure_bf16=False):
    """Token KL to a teacher (the loss) over 6 steps × 2 epochs on fixed completions (sampling is left out: bf16 and
    fp32 logits would sample different tokens); one value per mini-batch, 4 per step."""
    from ral_core.rollout import rollouts_from_completions
    t = Trainer(_cfg(tmp, name, model, "steps=6", "epochs=2", "minibatch_size=4", "max_new_tokens=6",
                     "lambda_token_kl=1", f"teacher={teacher}", f"precision={precision}",
                     "reward_weights={exact_match: 1.0}"))  # an untrained model scores 0: A = 0, pure distillation
    if pure_bf16:  # the trainer before mixed precision: bf16 weights, so bf16 AdamW state, no masters
        for p in _model(t).parameters():
            p.data = p.data.to(torch.bfloat16)
    samples, comp = t._prompts(0), torch.randint(10, 300, (8, 6), generator=torch.Generator().manual_seed(0))
    vals = []
    for _ in range(6):
        with torch.no_grad(), t.precision.autocast():
            ro = rollouts_from_completions(t.adapter, samples, 4, comp, t.rewarder, t.spec, model=_model(t))
            t._fill_references(ro)
        vals += t.update_phase(ro)[1]["token_rkl"]
    return t, np.array(vals)


def test_bf16_mixed_loss_curve_tracks_fp32(tmp_path, bf16_dir):
    """Same bf16 checkpoint, lr 5e-5: bf16 autocast compute with fp32 masters stays within 2 % (of the starting
    value) of the fp32-compute curve at every mini-batch (measured: 0.5 %), while the curve itself falls by > 25 %;
    pure bf16 training misses it by ~10 %."""
    from ral_core.builders.tiny import tiny_qwen2_vl
    from ral_core.models import load_adapter
    teacher = _save(tiny_qwen2_vl(layers=2, seed=1, tokenizer=load_adapter(bf16_dir).tokenizer), tmp_path / "teacher")
    _, fp32 = _curve(tmp_path, "fp32", bf16_dir, teacher, "fp32")
    t, mixed = _curve(tmp_path, "mixed", bf16_dir, teacher, "bf16-mixed")
    assert t.precision.compute == torch.bfloat16
    m = _model(t)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in m.parameters())
    assert any(not p.requires_grad for p in m.parameters())  # the frozen vision tower stays bf16
    assert fp32[-1] < 0.75 * fp32[0]
    assert np.abs(mixed - fp32).max() <= 0.02 * fp32[0], np.abs(mixed - fp32).max() / fp32[0]
    _, pure = _curve(tmp_path, "pure", bf16_dir, teacher, "bf16-mixed", pure_bf16=True)
    assert np.abs(pure - fp32).max() > 0.02 * fp32[0]  # the tolerance can fail


def test_resume_of_a_bf16_checkpoint_is_exact(tmp_path, bf16_dir):
    """Masters and fp32 AdamW state round-trip through the checkpoint; without the masters file the resumed run
    drifts (the bf16 weights alone lose the small updates)."""
    extra = ["steps=3", "epochs=2", "minibatch_size=4", "save_every=1", "lambda_attn=1"]
    full = Trainer(_cfg(tmp_path, "full", bf16_dir, *extra))
    full.train()

    def stop_after_one(trainer, m):
        if trainer.step == 1:
            trainer.cancel.set()
    for name in ("part", "nomaster"):
        assert Trainer(_cfg(tmp_path, name, bf16_dir, *extra), callbacks=[stop_after_one]).train()["step"] == 1
    ck = tmp_path / "part" / "checkpoints" / "step-00001"
    from safetensors.torch import load_file
    opt_state = {k: v for k, v in load_file(str(ck / "trainer_state.safetensors")).items() if "exp_avg" in k}
    assert opt_state and {v.dtype for v in opt_state.values()} == {torch.float32}
    (tmp_path / "nomaster" / "checkpoints" / "step-00001" / MASTER_WEIGHTS).unlink()
    runs = {}
    for name in ("part", "nomaster"):
        r = Trainer(_cfg(tmp_path, name, bf16_dir, *extra))
        r.train(resume=True)
        runs[name] = _masters(r)
    ref = _masters(full)
    assert all(torch.equal(ref[k], runs["part"][k]) for k in ref)
    assert any(not torch.equal(ref[k], runs["nomaster"][k]) for k in ref)


@pytest.mark.parametrize("precision", ["auto", "bf16-mixed"])
def test_lora_adapters_are_fp32(tmp_path, bf16_dir, precision):
    t = Trainer(_cfg(tmp_path, "lora", bf16_dir, "steps=1", "lora_r=4", "beta=0.04", f"precision={precision}"))
    params = dict(_model(t).named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    base = {p.dtype for n, p in params.items() if "lora_" not in n}
    assert base == ({torch.bfloat16} if precision == "bf16-mixed" else {torch.float32})
    t.train()
    assert all(s["exp_avg"].dtype == torch.float32 for s in t.opt.optimizer.state.values())
    assert np.isfinite(t.history[-1]["kl"])
    from safetensors.torch import load_file
    saved = load_file(str(t.latest_checkpoint() / "adapter_model.safetensors"))
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}


def test_fp32_checkpoint_is_unchanged(tmp_path, tiny_model_dir):
    t = Trainer(_cfg(tmp_path, "fp32", tiny_model_dir, "steps=1"))
    assert t.precision.mode == "fp32" and t.precision.storage == torch.float32
    t.train()
    ck = t.latest_checkpoint()
    assert not (ck / MASTER_WEIGHTS).exists()
    assert json.loads((ck / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen3_5", "gemma3"])
def test_bf16_mixed_step_in_every_family(tmp_path, family):
    """The GPU path (fp32 trainable, bf16 frozen, bf16 autocast) runs on the CPU too: one RAL step per family."""
    from ral_core.builders.tiny import tiny_adapter
    a = tiny_adapter(family)
    a.model.to(torch.bfloat16)
    t = Trainer(_cfg(tmp_path, family, "default", "steps=1", "epochs=2", "minibatch_size=4", "lambda_attn=1",
                     "precision=bf16-mixed", "lr=5e-3"), adapter=a)
    t.train()
    m = t.history[-1]
    assert np.isfinite(m["loss_grpo"]) and np.isfinite(m["loss_ral_attn"])
    assert {p.dtype for p in _model(t).parameters() if p.requires_grad} == {torch.float32}


def test_precision_choice_and_validation(monkeypatch):
    bf, f32 = torch.bfloat16, torch.float32
    assert resolve_precision("auto", f32, "cpu").mode == "fp32"
    assert resolve_precision("auto", bf, "cpu").compute is None  # CPU: fp32 compute
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = resolve_precision("auto", bf, "cuda")
    assert (p.mode, p.compute, p.frozen, p.storage) == ("bf16-mixed", bf, bf, bf)
    assert resolve_precision("auto", torch.float16, "cuda").frozen == torch.float16  # frozen weights saved unchanged
    assert resolve_precision("auto", f32, "cuda").mode == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", bf, "cuda").mode == "fp32"
    with pytest.raises(RALError, match="needs a GPU with bfloat16 support"):
        resolve_precision("bf16-mixed", bf, "cuda")
    with pytest.raises(RALError, match="precision must be auto, fp32 or bf16-mixed"):
        build_config(None, ["precision=bf16"])


def test_captured_rows_stay_fp32_under_autocast(tiny_qwen, task):
    """bf16-mixed training runs the forward under autocast: the captured rows must still be fp32 softmaxes."""
    from ral_core.attention import capture

    s = task.sample(0)
    mi = tiny_qwen.build_inputs([s.image], [s.question])["model_inputs"]
    L = mi["input_ids"].shape[1]
    rows = torch.tensor([[L - 1]])
    with torch.no_grad(), capture(tiny_qwen.model, layers="last", rows=rows) as ref:
        tiny_qwen.model(**mi)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            capture(tiny_qwen.model, layers="last", rows=rows) as mixed:
        tiny_qwen.model(**mi)
    (layer,) = ref
    assert mixed[layer].dtype == torch.float32
    assert torch.allclose(mixed[layer].sum(-1), torch.ones(()), atol=1e-6)
    assert (mixed[layer] - ref[layer]).abs().max() < 5e-2  # bf16 q/k from the forward, fp32 softmax
