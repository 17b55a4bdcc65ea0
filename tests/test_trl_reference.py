"""Our GRPO loss against values computed once by TRL 1.16's own code (scripts/make_trl_reference.py; TRL is not
imported here). Every loss type, β = 0 and > 0, one generation batch of 5 micro-batches with gradient
accumulation 2 (so a partial last window), through the functions the trainer calls: LossContext → combined_loss
→ accumulation_windows / Window.of / window_weight; log-probs through token_logprobs at a temperature ≠ 1."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ral_core.losses import (LOSS_NORMS, LossContext, Window, accumulation_windows, combined_loss, token_logprobs,
                             window_weight)

DATA = Path(__file__).parent / "data"
REF = load_file(str(DATA / "trl_reference.safetensors"))
META = json.loads((DATA / "trl_reference.json").read_text())
NORM = {trl: ours for ours, trl in LOSS_NORMS.items()}  # TRL loss_type → our loss_norm


def _our_window_losses(loss_type, beta, micro=None, max_len=None):
    """Each micro-batch's share of its window's loss and its gradient w.r.t. the per-token log-probs, as the
    trainer's update phase computes them. `micro`/`max_len` override what the trainer passes (to show that the
    test can fail)."""
    M, B = META["micro_batches"], META["batch_size"]
    mask = REF["in/mask"].bool()
    chunks = [torch.arange(j * B, (j + 1) * B) for j in range(M)]
    batch_tokens = float(mask.sum())
    losses, grads = torch.zeros(M, dtype=torch.float64), torch.zeros(REF["in/logp"].shape, dtype=torch.float64)
    for window in accumulation_windows(chunks, META["gradient_accumulation_steps"]):
        win = Window.of(window, M * B, batch_tokens)
        if micro is not None:
            win = Window(micro=micro, share=win.share, batch_tokens=win.batch_tokens)
        for idx in window:
            j = int(idx[0]) // B
            logp = REF["in/logp"][j].clone().requires_grad_(True)
            ctx = LossContext(mask=mask[j], logp=logp, old_logp=REF["in/old_logp"][j], ref_logp=REF["in/ref_logp"][j],
                              advantages=REF["in/advantages"][j], norm=NORM[loss_type],
                              max_len=max_len or META["max_completion_length"], clip_low=META["epsilon_low"],
                              clip_high=META["epsilon_high"])
            total, _ = combined_loss(ctx, {"grpo": 1.0, "kl": beta})
            share = total * window_weight(ctx.norm, ctx.mask, win)
            share.backward()
            losses[j], grads[j] = float(share.detach()), logp.grad.double()
    return losses, grads


def test_the_reference_was_made_by_trl_1_16():
    assert META["trl"] == "1.16.0" and "trl.GRPOTrainer._compute_loss" in META["entry_points"]
    assert set(META["loss_types"]) == set(NORM) and META["micro_batches"] % META["gradient_accumulation_steps"]


@pytest.mark.parametrize("beta", META["betas"])
@pytest.mark.parametrize("loss_type", META["loss_types"])
def test_loss_and_gradients_match_trl_over_accumulation_windows(loss_type, beta):
    losses, grads = _our_window_losses(loss_type, beta)
    ref_l, ref_g = REF[f"{loss_type}/beta{beta}/loss"], REF[f"{loss_type}/beta{beta}/grad"]
    assert float((losses - ref_l).abs().max()) <= 1e-6
    assert float((grads - ref_g).abs().max()) <= 1e-6
    assert float(ref_g.abs().max()) > 1e-3 and (ref_g[~REF["in/mask"].bool()] == 0).all()


def test_the_reference_tells_the_old_normalisation_apart():
    """Dividing the partial window by grad_accum, dr_grpo by the padded width, or each micro-batch by its own
    tokens (the old 'token', now 'bnpo') misses TRL by far more than the tolerance."""
    w = META["gradient_accumulation_steps"]
    for lt in META["loss_types"]:
        half, _ = _our_window_losses(lt, 0.0, micro=w)
        assert float((half[-1] - REF[f"{lt}/beta0.0/loss"][-1]).abs()) > 1e-3 or lt == "dapo"
    width, _ = _our_window_losses("dr_grpo", 0.0, max_len=META["width"])
    assert float((width - REF["dr_grpo/beta0.0/loss"]).abs().max()) > 1e-3
    own, _ = _our_window_losses("bnpo", 0.0)
    assert float((own - REF["dapo/beta0.0/loss"]).abs().max()) > 1e-3


def test_log_probs_use_the_sampling_temperature_as_trl():
    """TRL's fused LM head divides the logits by the temperature before the log-softmax (policy, old policy and
    reference alike); token_logprobs, which every log-prob of our loss goes through, does the same."""
    hidden, weight, ids = REF["lp/hidden"], REF["lp/weight"], REF["lp/ids"]
    logits = hidden[:, :-1] @ weight.T  # position k scores token k + 1
    ours = token_logprobs(logits, ids[:, 1:], META["temperature"])
    # both are fp32 (log-probs down to −8 here): each lies within 1e-6 relative of the fp64 value
    assert float(((ours - REF["lp/logps"]).abs() / REF["lp/logps"].abs().clamp_min(1)).max()) <= 2e-6
    assert float((token_logprobs(logits, ids[:, 1:]) - REF["lp/logps"]).abs().max()) > 1e-2


def test_rollout_and_training_log_probs_are_taken_at_the_sampling_temperature(tiny_qwen, task):
    from ral_core.policy import policy_forward
    from ral_core.rollout import rollouts_from_completions
    s = task.sample(0)
    samples = [dict(image=s.image, question=s.question, answer=s.answer, boxes=s.boxes)]
    ids = [tiny_qwen.tokenizer.convert_tokens_to_ids(x) for x in ("4", "2", "<|im_end|>")]
    comp = torch.tensor([ids, ids])
    hot = rollouts_from_completions(tiny_qwen, samples, 2, comp, None, None, temperature=0.7)
    cold = rollouts_from_completions(tiny_qwen, samples, 2, comp, None, None)
    with torch.no_grad():
        _, _, raw = policy_forward(tiny_qwen.model, cold, None, need_logits=True)  # T = 1: the model's logits
        train_logp, _, _ = policy_forward(tiny_qwen.model, hot, None)            # the training forward (and ref)
    want = torch.log_softmax(raw / 0.7, -1).gather(-1, comp[..., None]).squeeze(-1)
    torch.testing.assert_close(hot.old_logp, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(train_logp, want, atol=1e-6, rtol=1e-5)
    assert float((cold.old_logp - want).abs().max()) > 1e-3


def test_the_trainer_weights_a_partial_window_by_its_real_size(tmp_path, tiny_model_dir, monkeypatch):
    """3 micro-batches, grad_accum 2: windows of 2 and 1. The lone micro-batch of the last window is its whole
    loss (weight 1, not 1/2), as TRL's current_gradient_accumulation_steps makes it."""
    import ral_core.trainer as trainer_mod
    from ral_core.config import build_config
    from test_trainer import BASE  # noqa: F401  (also registers the test reward)
    seen, real = [], trainer_mod.window_weight

    def spy(norm, mask, win):
        seen.append((win.micro, real(norm, mask, win)))
        return seen[-1][1]
    monkeypatch.setattr(trainer_mod, "window_weight", spy)
    cfg = build_config(None, BASE + [f"output_dir={tmp_path}", f"model={tiny_model_dir}", "steps=1",
                                     "prompts_per_step=3", "group_size=2", "minibatch_size=2", "grad_accum=2",
                                     "loss_norm=bnpo", "log_attention=false"])
    t = trainer_mod.Trainer(cfg)
    t.train()
    assert seen == [(2, 0.5), (2, 0.5), (1, 1.0)] and t.history[0]["updates"] == 2
