"""The silence diagnostic (docs/method.md §6, 'where the term is silent'): rollouts that share a row's prefix
add up to J_c · Σ_{i∈c} A_i, so a shared row is silent only when its class's advantages sum to zero (the whole
group shares it) or the group's rewards were all equal. Checked against the RAL term's real gradient."""
import pytest
import torch

from ral_core.generation import generate_answer
from ral_core.losses import LossContext, group_advantages, grpo, ral_attention
from ral_core.policy import PolicySpec, policy_forward, prefix_classes
from ral_core.rollout import attention_stats, class_advantage, rollouts_from_completions, silence_stats


def _samples(task, n):
    return [dict(image=s.image, question=s.question, answer=s.answer, boxes=s.boxes) for s in task.samples(n)]


def _first_update(adapter, ro):
    """One real GRPO update on the batch (after it p_θ ≠ p_old, so the attention term can have a gradient)."""
    adapter.model.zero_grad(set_to_none=True)
    logp, _, _ = policy_forward(adapter.model, ro, None)
    grpo(LossContext(mask=ro.mask, logp=logp, old_logp=ro.old_logp, advantages=ro.advantages))[0].backward()
    torch.optim.SGD(adapter.model.parameters(), lr=0.5).step()


def _attn_grad(adapter, ro, spec, rows):
    """Largest |∂ L_attn / ∂θ| from the response rows `rows` only."""
    adapter.model.zero_grad(set_to_none=True)
    _, attn, _ = policy_forward(adapter.model, ro, spec)
    ral_attention(LossContext(mask=ro.mask & rows, advantages=ro.advantages, attn=attn,
                              attn_old=ro.old_attn))[0].backward()
    grads = [p.grad.abs().max() for p in adapter.model.parameters() if p.grad is not None]
    return float(torch.stack(grads).max()) if grads else 0.0


def test_two_identical_pairs_hand_computed_shares():
    comp = torch.tensor([[1, 2, 0], [1, 2, 0], [1, 3, 0], [1, 3, 0]])  # two identical pairs, 12 response rows
    ones = torch.ones_like(comp, dtype=torch.bool)
    A, group = torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.zeros(4, dtype=torch.long)
    own = silence_stats(prefix_classes(comp, ones, group, "own"), A, group)
    # 'own': token 0's row (prefix "1") is the whole group's: cancels; tokens 1, 2 are pairs with Σ A = ±2: act
    assert own == pytest.approx({"ral_rows_zero_var": 0.0, "ral_rows_cancelled": 4 / 12, "ral_rows_acting": 8 / 12,
                                 "ral_effective_weight": 8 / 12, "rows_prefix_shared": 1.0})
    pred = silence_stats(prefix_classes(comp, ones, group, "predicts"), A, group)
    # 'predicts': tokens 0 (the prompt) and 1 (prefix "1") are the whole group's; token 2 is a pair's
    assert pred == pytest.approx({"ral_rows_zero_var": 0.0, "ral_rows_cancelled": 8 / 12, "ral_rows_acting": 4 / 12,
                                  "ral_effective_weight": 4 / 12, "rows_prefix_shared": 1.0})
    assert class_advantage(prefix_classes(comp, ones, group, "own"), A)[:, 1].tolist() == [2.0, 2.0, -2.0, -2.0]


@pytest.mark.parametrize("row", ["own", "predicts"])
def test_two_identical_pairs_every_row_shared_yet_the_term_acts(model, task, row):
    """A = [1, 1, −1, −1]: every row has a twin, but inside a twin pair the advantages add up. The diagnostic
    says 'acts' there, and after the first update the term's gradient from those rows is non-zero; from the
    row the whole group shares it stays ~0."""
    tok = model.tokenizer
    a, b, c = (tok.convert_tokens_to_ids(x) for x in ("1", "2", "3"))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    comp = torch.tensor([[a, b, eos], [a, b, eos], [a, c, eos], [a, c, eos]])
    spec = PolicySpec(layers=[2], row=row)
    ro = rollouts_from_completions(model, _samples(task, 1), 4, comp, None, spec)
    ro.advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    stats = attention_stats(ro.old_attn, ro)
    assert stats["rows_prefix_shared"] == 1.0 and stats["ral_rows_acting"] > 0
    net = class_advantage(ro.row_class, ro.advantages)
    acting, cancelled = net.abs() > 1e-5, (net.abs() <= 1e-5) & ro.mask
    assert cancelled[:, 0].all()          # the whole group's first row, under either convention
    assert acting.sum() == (8 if row == "own" else 4)
    assert _attn_grad(model, ro, spec, ro.mask) == 0.0  # update 1: p_θ = p_old, silent everywhere
    _first_update(model, ro)
    assert _attn_grad(model, ro, spec, acting) > 1e-6
    assert _attn_grad(model, ro, spec, cancelled) < 1e-9


def test_the_whole_group_first_row_cancels_on_sampled_rollouts(model, task):
    """Sampled rollouts, group-normalised advantages: the 'predicts' row of the first answer token (the prompt's
    last position) is every rollout's; it is classed 'cancelled' and its gradient stays ~0 after an update."""
    torch.manual_seed(0)
    samples = _samples(task, 2)
    b = model.build_inputs([s["image"] for s in samples for _ in range(4)],
                           [s["question"] for s in samples for _ in range(4)])
    comp = generate_answer(model, b["model_inputs"], 4, do_sample=True)
    spec = PolicySpec(layers=[2], row="predicts")
    ro = rollouts_from_completions(model, samples, 4, comp, None, spec, built=b)
    ro.advantages, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]), ro.group)
    net = class_advantage(ro.row_class, ro.advantages)
    assert net[:, 0].abs().max() < 1e-5
    first = torch.zeros_like(ro.mask)
    first[:, 0] = True
    _first_update(model, ro)
    assert _attn_grad(model, ro, spec, ro.mask) > 1e-6  # the term acts somewhere...
    assert _attn_grad(model, ro, spec, first) < 1e-9    # ...but not on the first row


def test_zero_variance_group_is_reported_apart_and_silent(model, task):
    """Group 0's rewards are all equal (A = 0, silent for every row, shared or not); group 1's are not."""
    tok = model.tokenizer
    ids = [tok.convert_tokens_to_ids(x) for x in "12345"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    comp = torch.tensor([[ids[0], ids[1], eos], [ids[2], ids[3], eos], [ids[0], ids[4], eos], [ids[1], ids[2], eos]])
    spec = PolicySpec(layers=[2], row="own")
    ro = rollouts_from_completions(model, _samples(task, 2), 2, comp, None, spec)
    ro.advantages, zero = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0]), ro.group)
    assert zero == 1
    s = silence_stats(ro.row_class, ro.advantages, ro.group)
    # every row is its own class (no prefix shared): group 0's 6 rows are zero-variance, group 1's 6 act
    assert s == pytest.approx({"ral_rows_zero_var": 0.5, "ral_rows_cancelled": 0.0, "ral_rows_acting": 0.5,
                               "ral_effective_weight": 1.0, "rows_prefix_shared": 0.0})
    _first_update(model, ro)
    g0 = (ro.group == 0)[:, None] & ro.mask
    assert _attn_grad(model, ro, spec, g0) == 0.0
    assert _attn_grad(model, ro, spec, ~g0 & ro.mask) > 1e-6


def test_the_trainer_logs_the_three_shares(model, task):
    torch.manual_seed(1)
    samples = _samples(task, 2)
    b = model.build_inputs([s["image"] for s in samples for _ in range(4)],
                           [s["question"] for s in samples for _ in range(4)])
    comp = generate_answer(model, b["model_inputs"], 4, do_sample=True)
    ro = rollouts_from_completions(model, samples, 4, comp, None, PolicySpec(layers=[2]), built=b)
    ro.advantages, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), ro.group)
    s = attention_stats(ro.old_attn, ro)
    assert s["ral_rows_zero_var"] == pytest.approx(0.5, abs=0.2)  # group 1 (half the rollouts) has equal rewards
    assert s["ral_rows_zero_var"] + s["ral_rows_cancelled"] + s["ral_rows_acting"] == pytest.approx(1.0)
    assert 0 < s["ral_effective_weight"] <= 1 and "shared_row_frac" not in s
