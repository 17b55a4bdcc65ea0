"""Attention exploration and the causal-lever map (the remedy for the silent decisive row)."""
import numpy as np
import pytest
import torch

from ral_core.config import build_config
from ral_core.levers import lever_map
from ral_core.losses import LossContext, explore_attention, group_advantages, ral_attention
from ral_core.policy import ExploreSpec, PolicySpec, forward_policies
from ral_core.rollout import make_rollouts
from ral_core.trainer import Trainer

from test_trainer import BASE, _params  # noqa: F401  (registers the test reward)


def _samples(task, n, start=0):
    return [dict(image=s.image, question=s.question, answer=s.answer, boxes=s.boxes) for s in task.samples(n, start)]


def test_sigma_zero_reproduces_the_run_without_exploration(tmp_path, tiny_model_dir):
    runs = {}
    for name, extra in [("off", []), ("sigma0", ["explore=true", "explore_sigma=0", "explore_layers=last"]),
                        ("sigma2", ["explore=true", "explore_sigma=2", "explore_layers=last"])]:
        cfg = build_config(None, BASE + [f"output_dir={tmp_path / name}", f"model={tiny_model_dir}", "epochs=2"] + extra)
        t = Trainer(cfg)
        t.train()
        runs[name] = _params(t)
    assert all(torch.equal(runs["off"][k], runs["sigma0"][k]) for k in runs["off"])
    assert any(not torch.equal(runs["off"][k], runs["sigma2"][k]) for k in runs["off"])
    assert "explore_jsd_natural" in t.history[-1] and t.history[-1]["explore_bias_abs"] > 0


def _explore_grad(adapter, ro, explore, row_mask):
    adapter.model.zero_grad(set_to_none=True)
    r = forward_policies(adapter.model, ro, None, explore)
    val, _ = explore_attention(LossContext(mask=ro.mask & row_mask, advantages=ro.advantages,
                                           attn_natural=r["natural"], attn_explored=ro.explored_attn))
    val.backward()
    return float(torch.stack([p.grad.abs().max() for p in adapter.model.parameters() if p.grad is not None]).max())


def test_exploration_term_acts_on_the_first_update_and_on_the_decisive_row(model, task):
    torch.manual_seed(0)
    explore = ExploreSpec(layers=[1, 2], sigma=2.0)
    ro = make_rollouts(model, _samples(task, 2), 4, None, None, max_new_tokens=3, explore=explore)
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -0.3, -0.2, -0.5])
    decisive = torch.zeros_like(ro.mask)
    decisive[:, 0] = True  # the row that decides the first answer token: identical prefix for the whole group
    assert _explore_grad(model, ro, explore, decisive) > 1e-6
    # the paper's RAL term on that same row, same rollouts and same (first) update: exactly silent
    spec = PolicySpec(layers=[1, 2], row="predicts")
    model.model.zero_grad(set_to_none=True)
    r = forward_policies(model.model, ro, spec, explore)
    old = forward_policies(model.model, ro, spec, explore)["attn"]
    ral_attention(LossContext(mask=ro.mask & decisive, advantages=ro.advantages, attn=r["attn"],
                              attn_old=[o.detach() for o in old]))[0].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.model.parameters())


def test_reward_for_attending_a_region_moves_natural_attention_there(model, task):
    """A synthetic task: the reward is how much the rollout's (explored) decisive-row attention lands on the
    target cell. Learning only from the exploration term must move the *natural* attention there."""
    torch.manual_seed(0)
    explore = ExploreSpec(layers=[2], sigma=2.0)
    samples = _samples(task, 4)
    opt = torch.optim.Adam([p for n, p in model.model.named_parameters() if "language_model" in n], lr=3e-3)

    def natural_target_mass():
        ro = make_rollouts(model, samples, 2, None, None, max_new_tokens=1, explore=ExploreSpec([2], sigma=0.0))
        with torch.no_grad():
            nat = forward_policies(model.model, ro, PolicySpec([2], row="predicts"))["attn"][0]
        return float((nat.mean(1)[:, 0] * ro.target_keys).sum(-1).mean())
    before = natural_target_mass()
    for _ in range(12):
        ro = make_rollouts(model, samples, 8, None, None, max_new_tokens=1, explore=explore)
        tm = (torch.stack([a.mean(1)[:, 0] for a in ro.explored_attn]).mean(0) * ro.target_keys).sum(-1)
        ro.rewards = tm
        ro.advantages, _ = group_advantages(tm, ro.group)
        for _ in range(2):
            opt.zero_grad()
            r = forward_policies(model.model, ro, None, explore)
            explore_attention(LossContext(mask=ro.mask, advantages=ro.advantages, attn_natural=r["natural"],
                                          attn_explored=ro.explored_attn))[0].backward()
            opt.step()
    after = natural_target_mass()
    assert after > before * 1.3, (before, after)


def test_lever_map_ranks_a_wired_layer_above_a_disconnected_one(model, task):
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if "layers.2.self_attn.o_proj" in n:
                p.zero_()  # layer 2's attention output never reaches the residual stream
            if "language_model" in n and "q_proj.weight" in n:
                p.mul_(5.0)  # sharper attention so steering has something to move
    m = lever_map(model, _samples(task, 6), strength=3.0, per_head=True)
    assert m.layers == [0, 1, 2]
    assert m.effect[2] == 0.0 and np.all(m.head_effect[2] == 0.0)   # steering layer 2 cannot move the answer
    assert m.attn_shift[2] > 0.1                                    # … although it did move its attention
    assert abs(m.effect[0]) > 1e-3 and m.ranked()[-1] == 2
    assert m.top(2) == [0, 1]


def test_lever_map_without_boxes_scans_image_regions(model, task):
    s = _samples(task, 2)
    for x in s:
        x["boxes"] = []
    m = lever_map(model, s, layers=[0, 2], strength=2.0)
    assert m.layers == [0, 2] and np.isfinite(m.effect).all()


def test_lever_layers_come_from_a_map_at_the_configured_strength(tmp_path, tiny_model_dir):
    from ral_core.errors import RALError
    cfg = build_config(None, BASE + [f"output_dir={tmp_path / 'lv'}", f"model={tiny_model_dir}", "explore=true",
                                     "explore_layers=levers", "explore_lever_strength=1.5"])
    t = Trainer(cfg)
    layers = t._explore_layers()
    assert t.levers.strength == 1.5 and layers == t.levers.top(2)
    with pytest.raises(RALError, match="explore_lever_strength"):
        build_config(None, BASE + ["explore_lever_strength=0"])
