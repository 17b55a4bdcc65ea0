"""The work the G rollouts of a step share is done once (vision_cache.py, prefix_share.py), and nothing else changes.

- vision-feature cache: every family's logits and sampled tokens are bit-identical with it;
- group prefill (one prompt prefill per group): the sampled tokens are bit-identical (same seed);
- shared prompt in teacher-forced passes: logits, captured rows and gradients within float tolerance;
- on the default model, 3 training steps: bit-identical with the cache, within float tolerance when shared;
- each distinct image is encoded once per step; the cache turns itself off (with a run-log note) when the vision
  tower is trained.
"""
import pytest
import torch

from ral_core.attention import capture
from ral_core.config import build_config
from ral_core.data import GroundingTask
from ral_core.generation import generate_answer
from ral_core.builders.tiny import TINY_FAMILIES, tiny_adapter
from ral_core.prefix_share import group_generate, shared_prompt_forward, shares_with_grad, worth_sharing
from ral_core.trainer import Trainer
from ral_core.vision_cache import VisionCache, distinct_images

G = 3


@pytest.fixture(scope="module")
def samples():
    return GroundingTask(kinds=("cell", "row"), split="train", seed=1).samples(2)


def _batch(ad, samples):
    images = [s.image for s in samples for _ in range(G)]
    b = ad.build_inputs(images, [s.question for s in samples for _ in range(G)])["model_inputs"]
    uniq, rows = distinct_images(images)
    group = torch.arange(len(samples)).repeat_interleave(G)
    return b, VisionCache.encode(ad, uniq), rows, group


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cache_and_group_prefill_are_bit_identical(family, samples):
    ad = tiny_adapter(family)
    ad.model.eval()
    b, vc, rows, group = _batch(ad, samples)
    assert vc.encodings == len(samples)  # 6 rows, 2 distinct images
    with torch.no_grad():
        assert torch.equal(ad.model(**b).logits, ad.model(**vc.model_inputs(b, rows)).logits)
    torch.manual_seed(0)
    plain = generate_answer(ad, b, 8, do_sample=True)
    torch.manual_seed(0)
    cached = generate_answer(ad, vc.model_inputs(b, rows), 8, do_sample=True)
    torch.manual_seed(0)
    grouped = group_generate(ad, b, group, vc, rows, max_new_tokens=8, do_sample=True)
    assert torch.equal(plain, cached) and torch.equal(plain, grouped)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_prompt_pass_matches_full_sequences(family, samples):
    ad = tiny_adapter(family)
    b, vc, rows, group = _batch(ad, samples)
    torch.manual_seed(1)
    comp = generate_answer(ad, b, 6, do_sample=True)
    inputs = ad.extend_inputs(b, comp, torch.ones_like(comp, dtype=torch.bool))
    P, T = b["input_ids"].shape[1], comp.shape[1]
    layer = ad.attention_layers[-1]
    N = comp.shape[0]
    w = torch.randn(N, T, ad.model.config.get_text_config().vocab_size, generator=torch.Generator().manual_seed(0))

    grad = shares_with_grad(ad.model)
    assert grad == (family != "qwen3_5")  # hybrid: shared only without gradient (rollout.forward_policies)

    @torch.set_grad_enabled(grad)
    def run(shared):
        ad.model.zero_grad(set_to_none=True)
        if shared:
            with capture(ad.model, layers=[layer], rows=torch.arange(T + 1)[None].expand(N, T + 1)) as maps:
                logits = shared_prompt_forward(ad.model, inputs, group, P, vc, rows, keep=torch.arange(T)).logits
        else:
            with capture(ad.model, layers=[layer], rows=torch.arange(P - 1, P + T)[None].expand(N, T + 1)) as maps:
                logits = ad.model(**vc.model_inputs(inputs, rows), logits_to_keep=torch.arange(P - 1, P + T - 1),
                                  use_cache=False).logits
        attn = maps[layer]
        if not grad:
            return logits, attn, {}
        ((logits * w).sum() + 10 * (attn * attn).sum()).backward()
        grads = {n: p.grad.clone() for n, p in ad.model.named_parameters() if p.grad is not None}
        return logits.detach(), attn.detach(), grads

    lf, af, gf = run(False)
    ls, as_, gs = run(True)
    assert lf.shape == ls.shape and as_.shape == af.shape
    torch.testing.assert_close(ls, lf, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(as_, af, atol=2e-6, rtol=1e-4)
    assert gf.keys() == gs.keys() and (gf or not grad)
    for n in gf:
        torch.testing.assert_close(gs[n], gf[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def _run(tmp_path, name, extra):
    cfg = build_config("ral", ["model=default", f"output_dir={tmp_path / name}", "steps=3", "seed=0",
                               "prompts_per_step=4", "group_size=4", "minibatch_size=8", "snapshot_every=0",
                               "save_every=0", "attn_metrics_every=1"] + extra)
    t = Trainer(cfg)
    t.train()
    return t


def test_default_model_three_steps(tmp_path):
    plain = _run(tmp_path, "plain", ["vision_cache=false", "share_prompt=false"])
    cached = _run(tmp_path, "cached", ["vision_cache=true", "share_prompt=false"])
    shared = _run(tmp_path, "shared", ["vision_cache=true", "share_prompt=true"])
    assert cached.last_rollouts.vision is not None and shared.last_rollouts.share_prompt
    assert plain.last_rollouts.vision is None
    pp = dict(plain.model.named_parameters())
    ro_p = plain.last_rollouts
    for t, exact in ((cached, True), (shared, False)):
        ro = t.last_rollouts
        assert torch.equal(ro.completion, ro_p.completion)  # same samples from the same seed, every step
        for a, b in zip(plain.history, t.history):
            for k in ("loss_grpo", "loss_ral_attn", "reward", "attn_jsd_after_update"):
                assert a[k] == b[k] if exact else a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
        for n, p in t.model.named_parameters():
            if exact:
                assert torch.equal(p, pp[n]), n
            else:
                torch.testing.assert_close(p, pp[n], atol=1e-5, rtol=1e-5)
        if exact:
            assert torch.equal(ro.old_logp, ro_p.old_logp)
            assert all(torch.equal(a, b) for a, b in zip(ro.old_attn, ro_p.old_attn))
        else:
            torch.testing.assert_close(ro.old_logp, ro_p.old_logp, atol=2e-5, rtol=1e-5)
            for a, b in zip(ro.old_attn, ro_p.old_attn):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _count_encodings(trainer):
    from ral_core.vision_cache import _encoder_owner
    owner = _encoder_owner(trainer.model)
    seen = []
    h = owner.visual.register_forward_hook(lambda m, args, kw, out: seen.append(int(kw["grid_thw"].shape[0])),
                                           with_kwargs=True)
    try:
        trainer.train_step()
    finally:
        h.remove()
    return seen


def test_each_image_is_encoded_once_per_step(tmp_path):
    extra = ["steps=1", "prompts_per_step=2", "group_size=4", "minibatch_size=4", "attn_metrics_every=1"]
    cfg = build_config("ral", ["model=default", f"output_dir={tmp_path / 'a'}", "share_prompt=true"] + extra)
    assert _count_encodings(Trainer(cfg)) == [2]  # one tower call for the step's 2 distinct images
    cfg = build_config("ral", ["model=default", f"output_dir={tmp_path / 'b'}", "vision_cache=false"] + extra)
    seen = _count_encodings(Trainer(cfg))
    # without it: 8 in generation, 8 in scoring, 4 per mini-batch in 4 updates, 8 in the attention metric
    assert sum(seen) == 8 + 8 + 4 * 4 + 8


def test_cache_off_when_the_vision_tower_trains(tmp_path):
    cfg = build_config("grpo", ["model=default", f"output_dir={tmp_path / 'r'}", "steps=1", "freeze_vision=false",
                                "snapshot_every=0"])
    t = Trainer(cfg)
    assert not t.vision_cache and t.share_prompt == "false"
    t.train()
    assert t.last_rollouts.vision is None
    assert "vision-feature cache off" in (tmp_path / "r" / "run.log").read_text()


def test_share_prompt_rule():
    assert worth_sharing("auto", 1000, 32) and worth_sharing("auto", 29, 12) and not worth_sharing("auto", 12, 16)
    assert worth_sharing("true", 10, 100) and not worth_sharing("false", 1000, 1) and not worth_sharing(False, 9e9, 1)


def test_lm_head_gets_a_contiguous_input(samples):
    """generate's prefill slices the last position of a batch (a non-contiguous view); the CPU matmul would then
    broadcast the head's weight per sequence (bench/results/real.md). Every adapter's head sees contiguous input."""
    ad = tiny_adapter("qwen2_vl")
    seen = []
    ad.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    b, vc, rows, group = _batch(ad, samples)
    generate_answer(ad, b, 2)
    assert seen and all(seen)


def test_gradient_checkpointing_trains_without_sharing_the_prompt_in_updates(tmp_path):
    """Checkpointed layers recompute in the backward and transformers drops the cache while training with them:
    updates then run full sequences (scoring still shares), and the step trains."""
    from ral_core.attention import enable_gradient_checkpointing
    cfg = build_config("ral", ["model=default", f"output_dir={tmp_path / 'c'}", "steps=1", "prompts_per_step=8",
                               "group_size=4", "minibatch_size=16", "share_prompt=true", "snapshot_every=0"])
    t = Trainer(cfg)
    enable_gradient_checkpointing(t.model)
    assert not shares_with_grad(t.model)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    m = t.train_step()
    assert t.last_rollouts.share_prompt and m["updates"] == 4
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters() if p.requires_grad)
