"""The losses on hand-checked numbers, and the attention term's documented behaviour on a real tiny Qwen2-VL:
the policy rows, zero gradient on the first update, cancellation only where a shared row's advantages sum to zero,
sign, OPAD. (The silence diagnostic: test_silence.py; TRL agreement: test_trl_reference.py.)"""
import math

import pytest
import torch

from ral_core.losses import (LossContext, aggregate, group_advantages, grpo, jsd, kl_k3, opad_attention,
                             ral_attention)
from ral_core.policy import PolicySpec, forward_policies, policy_forward, prefix_classes
from ral_core.rollout import class_advantage, rollouts_from_completions


# ---- GRPO surrogate, by hand ----------------------------------------------------------------------
# ratios e^{logp}: row 0 (A = 1): 1.10517, 0.74082 → min(rA, clip(r)A) = 1.10517, 0.74082 (clip raises it to 0.8,
# the min keeps 0.74082); the third token is masked. Row 1 (A = −0.5): 1.28403 → clipped 1.2, min picks
# −0.64201; 1 → −0.5; 0.90484 → −0.45242. Per-token losses are the negatives.
PER_TOKEN = [-1.1051709180756477, -0.7408182206817179, 0.6420127083438707, 0.5, 0.45241870901797976]


@pytest.mark.parametrize("norm,expected", [
    ("token", sum(PER_TOKEN) / 5),                                        # mean over the micro-batch's 5 tokens
    ("bnpo", sum(PER_TOKEN) / 5),                                         # the same within one micro-batch
    ("sequence", (sum(PER_TOKEN[:2]) / 2 + sum(PER_TOKEN[2:]) / 3) / 2),  # mean of per-sequence means
    ("dr_grpo", sum(PER_TOKEN) / 8),                        # sum / (N · max_len), max_len 4 > the padded width 3
])
def test_grpo_matches_hand_computation(norm, expected):
    ctx = LossContext(mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
                      logp=torch.tensor([[0.1, -0.3, 9.0], [0.25, 0.0, -0.1]]), old_logp=torch.zeros(2, 3),
                      advantages=torch.tensor([1.0, -0.5]), norm=norm, max_len=4)
    val, m = grpo(ctx)
    assert math.isclose(float(val), expected, rel_tol=1e-6)
    assert math.isclose(expected, {"token": -0.050311544, "bnpo": -0.050311544, "sequence": -0.195758715,
                                   "dr_grpo": -0.031444715}[norm], rel_tol=1e-7)
    # ratios outside [0.8, 1.2] here move against their advantage, so the min keeps the unclipped term
    assert m["clip_frac"] == 0.0
    ctx.advantages = torch.tensor([1.0, 0.5])  # now row 1, token 0 (ratio 1.284, A > 0) is clipped
    assert grpo(ctx)[1]["clip_frac"] == pytest.approx(1 / 5)


def test_k3_kl_and_jsd_values():
    ctx = LossContext(mask=torch.ones(1, 2, dtype=torch.bool), logp=torch.tensor([[0.0, -1.0]]),
                      ref_logp=torch.tensor([[0.0, -0.5]]))
    val, _ = kl_k3(ctx)  # r = 0 → 0 ; r = 0.5 → e^0.5 − 1.5
    assert float(val) == pytest.approx((math.exp(0.5) - 1.5) / 2, rel=1e-6)
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    # m = (0.25, 0.5, 0.25): JSD = ½(0.5 ln 2 + 0) + ½(0 + 0.5 ln 2) = ½ ln 2
    assert float(jsd(p, q)) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert float(jsd(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2), rel=1e-6)


def test_jsd_gradient_is_the_analytic_one_and_zero_at_equality():
    p = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    q = torch.tensor([0.4, 0.4, 0.2])
    jsd(p, q).backward()
    torch.testing.assert_close(p.grad, 0.5 * torch.log(2 * p.detach() / (p.detach() + q)))
    p2 = q.clone().requires_grad_(True)
    jsd(p2, q).backward()
    assert torch.count_nonzero(p2.grad) == 0


def test_group_advantages_and_zero_variance_groups():
    A, zero = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert zero == 1 and A[4] == 0 and A[5] == 0
    assert float(A[:2].sum()) == pytest.approx(0.0, abs=1e-7) and float(A[0]) > 0


def test_aggregate_rejects_unknown_norm_and_dr_grpo_without_the_maximum_length():
    with pytest.raises(ValueError, match="token, bnpo, sequence or dr_grpo"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "bogus")
    with pytest.raises(ValueError, match="maximum completion length"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "dr_grpo")  # never silently the padded width


# ---- the attention term on a real tiny model ------------------------------------------------------
def _samples(task, n):
    return [dict(image=s.image, question=s.question, answer=s.answer, boxes=s.boxes) for s in task.samples(n)]


def _ids(adapter, *texts):
    return [adapter.tokenizer.convert_tokens_to_ids(t) for t in texts]


@pytest.fixture()
def model(tiny_qwen):
    state = {k: v.clone() for k, v in tiny_qwen.model.state_dict().items()}
    yield tiny_qwen
    tiny_qwen.model.load_state_dict(state)  # the session fixture stays pristine


def _attn_grad(adapter, ro, spec, row_mask=None):
    adapter.model.zero_grad(set_to_none=True)
    _, attn, _ = policy_forward(adapter.model, ro, spec)
    mask = ro.mask if row_mask is None else ro.mask & row_mask
    val, _ = ral_attention(LossContext(mask=mask, advantages=ro.advantages, attn=attn, attn_old=ro.old_attn))
    val.backward()
    grads = [p.grad.abs().max() for p in adapter.model.parameters() if p.grad is not None]
    return float(torch.stack(grads).max()) if grads else 0.0


def _perturb(adapter, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            if "language_model" in n and "self_attn" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_ral_gradient_is_zero_on_first_update_and_not_on_second(model, task):
    spec = PolicySpec(layers=[2])
    samples = _samples(task, 2)
    torch.manual_seed(0)
    from ral_core.generation import generate_answer
    b = model.build_inputs([s["image"] for s in samples for _ in range(4)],
                           [s["question"] for s in samples for _ in range(4)])
    comp = generate_answer(model, b["model_inputs"], 5, do_sample=True)
    ro = rollouts_from_completions(model, samples, 4, comp, None, spec, built=b)
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -0.3, -0.2, -0.5])
    assert _attn_grad(model, ro, spec) == 0.0            # update 1: p_θ = p_old exactly
    # update 1 with the token term moves the parameters; now the attention term acts
    model.model.zero_grad(set_to_none=True)
    logp, _, _ = policy_forward(model.model, ro, None)
    val, _ = grpo(LossContext(mask=ro.mask, logp=logp, old_logp=ro.old_logp, advantages=ro.advantages))
    val.backward()
    torch.optim.SGD(model.model.parameters(), lr=0.5).step()
    assert _attn_grad(model, ro, spec) > 1e-6           # update 2


@pytest.mark.parametrize("row", ["predicts", "own"])
def test_shared_rows_cancel_only_where_their_class_advantages_sum_to_zero(model, task, row):
    """Two pairs that share prefixes (ab·, ae·) in one group, with group-normalised advantages of rewards
    [1, 0, 0, 0]: inside each pair the advantages do not sum to zero, so rows shared by a pair act; only rows
    shared by the whole group cancel."""
    samples = _samples(task, 1)
    eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    a, b, c, d, e, f, g = _ids(model, "1", "2", "3", "4", "5", "6", "7")
    comp = torch.tensor([[a, b, c, eos], [a, b, d, eos], [a, e, f, eos], [a, e, g, eos]])
    A, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long))
    ones = torch.ones_like(comp, dtype=torch.bool)
    cls = prefix_classes(comp, ones, torch.zeros(4, dtype=torch.long), row)
    net = class_advantage(cls, A)
    # the whole group shares the rows of tokens 0 and 1 ('predicts': prompt, a) or token 0 ('own': a)
    whole = 2 if row == "predicts" else 1
    assert (cls[:, :whole] == cls[0, :whole]).all() and net[:, :whole].abs().max() < 1e-6
    # the next row is shared by a pair, A = (1.5, −0.5) and (−0.5, −0.5): it acts
    pair = torch.zeros_like(ones)
    pair[:, whole] = True
    assert cls[0, whole] == cls[1, whole] != cls[2, whole] == cls[3, whole]
    assert net[:, whole].tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0], abs=1e-3)
    spec = PolicySpec(layers=[2], row=row)
    ro = rollouts_from_completions(model, samples, 4, comp, None, spec)
    ro.advantages = A
    _perturb(model)  # p_θ ≠ p_old, as on a later update
    cancel = torch.zeros_like(ones)
    cancel[:, :whole] = True
    assert _attn_grad(model, ro, spec, row_mask=cancel) < 1e-9   # the whole group: exact cancellation
    assert _attn_grad(model, ro, spec, row_mask=pair) > 1e-5     # shared by a pair, yet acting


def test_prefix_classes_count_only_the_same_group_and_the_response():
    comp = torch.tensor([[1, 2], [1, 3], [1, 2]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    own = prefix_classes(comp, mask, torch.tensor([0, 0, 1]), "own")
    assert own[0, 0] == own[1, 0] and own[0, 1] != own[1, 1] and own[2, 0] != own[0, 0] and own[2, 1] == -1
    pred = prefix_classes(comp, mask, torch.tensor([0, 0, 0]), "predicts")
    assert (pred[:, 0] == pred[0, 0]).all() and pred[0, 1] == pred[1, 1] and pred[2, 1] == -1


def test_policy_rows_own_drops_its_self_entry_and_predicts_keeps_every_key(model, task):
    """docs/method.md §2: the 'own' row of token t is the query at t over keys < t, renormalised; the 'predicts' row
    is the query at t − 1 over all keys before t, itself included — a full softmax row, nothing renormalised."""
    samples = _samples(task, 1)
    comp = torch.tensor([_ids(model, "4", "2") + [model.tokenizer.convert_tokens_to_ids("<|im_end|>")]])
    ro = rollouts_from_completions(model, samples, 1, comp, None, None)
    P, T = ro.P, comp.shape[1]
    from ral_core.attention import capture
    with torch.no_grad(), capture(model.model, layers=[2]) as maps:  # every row: the raw softmax rows
        model.model(**ro.inputs)
    raw = maps[2].mean(1)[0]  # [L, L] head mean
    for row in ("own", "predicts"):
        with torch.no_grad():
            p = forward_policies(model.model, ro, PolicySpec(layers=[2], row=row))["attn"][0][0, 0]  # [T, K]
        for t in range(T):
            q = P + t if row == "own" else P + t - 1
            want = raw[q].clone()
            want[P + t:] = 0  # keys before token t only: drops the own row's self entry, nothing of 'predicts'
            torch.testing.assert_close(p[t], want / want.sum(), atol=1e-6, rtol=1e-5)
            if row == "predicts":
                assert float(raw[q, q]) > 1e-4 and float(p[t, q]) == pytest.approx(float(raw[q, q]), rel=1e-5)
            else:
                assert float(p[t, q]) == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_attention_term_sign_pulls_for_positive_and_pushes_for_negative(model, task, sign):
    spec = PolicySpec(layers=[2])
    samples = _samples(task, 1)
    comp = torch.tensor([_ids(model, "4", "2") + [model.tokenizer.convert_tokens_to_ids("<|im_end|>")]] * 2)
    ro = rollouts_from_completions(model, samples, 2, comp, None, spec)
    ro.advantages = torch.tensor([sign, sign])
    _perturb(model, scale=0.1)

    def dist():
        with torch.no_grad():
            _, attn, _ = policy_forward(model.model, ro, spec)
        return float(aggregate(jsd(attn[0], ro.old_attn[0]).mean(1), ro.mask))
    before = dist()
    opt = torch.optim.SGD(model.model.parameters(), lr=0.1)
    model.model.zero_grad(set_to_none=True)
    _, attn, _ = policy_forward(model.model, ro, spec)
    ral_attention(LossContext(mask=ro.mask, advantages=ro.advantages, attn=attn, attn_old=ro.old_attn))[0].backward()
    opt.step()
    after = dist()
    assert before > 1e-5
    assert (after < before) if sign > 0 else (after > before)


def test_opad_lowers_jsd_to_teacher(model, task):
    from ral_core.builders.tiny import tiny_qwen2_vl
    teacher = tiny_qwen2_vl(layers=3, seed=7, tokenizer=model.tokenizer)
    with torch.no_grad():  # random tiny models attend almost uniformly: sharpen the teacher so JSD is sizeable
        for n, p in teacher.model.named_parameters():
            if "language_model" in n and "q_proj.weight" in n:
                p.mul_(12.0)
    spec = PolicySpec(layers=[1, 2])
    samples = _samples(task, 2)
    comp = torch.tensor([_ids(model, "3", "1") + [model.tokenizer.convert_tokens_to_ids("<|im_end|>")]] * 4)
    ro = rollouts_from_completions(model, samples, 2, comp, None, spec)
    with torch.no_grad():
        _, ro.teacher_attn, _ = policy_forward(teacher.model, ro, spec)
    opt = torch.optim.Adam([p for p in model.model.parameters()], lr=3e-3)
    vals = []
    for _ in range(6):
        opt.zero_grad()
        _, attn, _ = policy_forward(model.model, ro, spec)
        val, m = opad_attention(LossContext(mask=ro.mask, attn=attn, attn_teacher=ro.teacher_attn))
        vals.append(float(val))
        val.backward()
        opt.step()
    assert vals[0] > 1e-4 and vals[-1] < 0.7 * vals[0]
