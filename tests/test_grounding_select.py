"""Which layers and heads the grounded terms read (ground_layers / ground_heads), apart from RAL's attn_layers: the
rows are exactly the chosen heads' mean at the chosen layers, the gradient reaches only them, the attention reward
reads the same rows, `levers` is the lever map's top, and bad values get one line."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ral_core.config import build_config  # noqa: E402
from ral_core.errors import RALError  # noqa: E402
from ral_core.grounding import attention_reward, mean_rows  # noqa: E402
from ral_core.levers import lever_map  # noqa: E402
from ral_core.losses import LossContext, combined_loss  # noqa: E402
from ral_core.policy import PolicySpec, forward_policies  # noqa: E402
from ral_core.rollout import make_rollouts  # noqa: E402
from ral_core.trainer import LEVER_PROBE_START, LEVER_PROBES, Trainer  # noqa: E402

torch.set_num_threads(1)
BASE = ["task_kinds=[cell]", "prompts_per_step=4", "group_size=4", "max_new_tokens=4", "minibatch_size=16",
        "epochs=1", "save_every=0", "snapshot_every=0", "attn_row=predicts", "attn_metrics_every=0"]
LAST = 3  # the default model's last decoder layer (4 layers, 4 heads of 32 dims)
HEAD_DIM = 32


def _trainer(tmp_path, name, *extra):
    return Trainer(build_config(None, BASE + [f"output_dir={tmp_path / name}"] + list(extra)))


def _rollouts(t):
    return make_rollouts(t.adapter, t._prompts(0), t.cfg.group_size, t.rewarder, t.spec, t.cfg.max_new_tokens,
                         t.cfg.temperature, gen_model=t.model)


def _per_head(t, ro, layer):
    """[N, H, T, K] each head's own row at `layer` (support all, 'predicts': a row's valid keys are all it sees,
    so the per-head policy is the raw attention row)."""
    with torch.no_grad():
        return forward_policies(t.model, ro, PolicySpec([layer], "predicts", "all", per_head=True))["attn"][0]


def test_ground_rows_are_the_chosen_heads_mean_at_the_chosen_layer(tmp_path):
    t = _trainer(tmp_path, "rows", "lambda_ground=1", "ground_layers=[1]", "ground_heads=[0, 2]")
    assert t.spec.layers == [LAST] and t.spec.ground_layers == [1] and t.spec.ground_heads == [0, 2]
    ro = _rollouts(t)
    with torch.no_grad():
        r = forward_policies(t.model, ro, t.spec)
    assert len(r["attn"]) == 1 and len(r["ground"]) == 1  # RAL keeps its layer; the grounded terms read theirs
    torch.testing.assert_close(r["attn"][0], forward_policies(t.model, ro, PolicySpec([LAST], "predicts"))["attn"][0])
    want = _per_head(t, ro, 1)[:, [0, 2]].mean(1, keepdim=True)
    torch.testing.assert_close(r["ground"][0], want / want.sum(-1, keepdim=True))
    assert not torch.allclose(r["ground"][0], _per_head(t, ro, 1).mean(1, keepdim=True), atol=1e-4)
    torch.testing.assert_close(ro.ground_attn[0], r["ground"][0])  # the rollout keeps the same rows


def test_default_selection_is_the_policy_rows(tmp_path):
    t = _trainer(tmp_path, "same", "lambda_ground=1")
    assert t.spec.ground_layers is None and t.spec.ground_heads is None
    with torch.no_grad():
        r = forward_policies(t.model, _rollouts(t), t.spec)
    assert r["ground"] is r["attn"]


def _target_grads(t, ro) -> dict:
    t.model.zero_grad(set_to_none=True)
    r = forward_policies(t.model, ro, t.spec)
    loss, _ = combined_loss(LossContext.of(ro, r, t.cfg), {"grpo": 0.0, "ground_kl": 1.0})
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in t.model.named_parameters()}


def test_the_target_gradient_reaches_only_the_chosen_head_and_layer(tmp_path):
    """One head of the last layer: its query rows get a gradient, the other heads' none (exactly); a first-layer
    target leaves every later layer untouched."""
    t = _trainer(tmp_path, "head", "lambda_ground=1", "ground_heads=[1]")
    ro = _rollouts(t)
    assert float(ro.ground["weight"].sum()) > 0
    q = _target_grads(t, ro)[f"model.language_model.layers.{LAST}.self_attn.q_proj.weight"]
    per_head = [float(q[h * HEAD_DIM:(h + 1) * HEAD_DIM].abs().sum()) for h in range(4)]
    assert per_head[1] > 1e-6 and per_head[0] == per_head[2] == per_head[3] == 0.0, per_head

    t = _trainer(tmp_path, "layer", "lambda_ground=1", "ground_layers=0")
    ro = _rollouts(t)
    g = _target_grads(t, ro)
    layer = {i: sum(float(v.abs().sum()) for n, v in g.items() if f"language_model.layers.{i}." in n)
             for i in range(4)}
    assert layer[0] > 0 and layer[1] == layer[2] == layer[3] == 0.0, layer


def test_attention_reward_reads_the_same_rows(tmp_path):
    t = _trainer(tmp_path, "rew", "reward_weights={exact_match: 1.0, attention_box: 1.0}", "temperature=3",
                 "ground_layers=[2]", "ground_heads=3")
    ro = _rollouts(t)
    rows = _per_head(t, ro, 2)[:, 3:4]
    want = attention_reward(mean_rows([rows], ro.mask), ro.visual_keys, ro.target_keys)
    torch.testing.assert_close(ro.sub_rewards["attention_box"].float(), want.cpu().float())
    policy_rows = attention_reward(mean_rows(ro.old_attn, ro.mask), ro.visual_keys, ro.target_keys)
    assert not torch.allclose(want, policy_rows, atol=1e-3)  # the check can fail


def test_levers_resolves_to_the_lever_maps_top(tmp_path):
    t = _trainer(tmp_path, "levers", "lambda_ground=1", "ground_layers=levers", "explore_top_k=2")
    probe = [t.data.sample(LEVER_PROBE_START + i) for i in range(LEVER_PROBES)]
    top = lever_map(t.adapter, probe, strength=t.cfg.explore_lever_strength).top(2)
    assert len(top) == 2 and t.spec.ground_layers == top and t.levers.top(2) == top


@pytest.mark.parametrize("extra, msg", [
    (["ground_layers=first"], "ground_layers must be policy, last, all, levers"),
    (["ground_heads=avg"], "ground_heads must be mean or a head index"),
    (["ground_heads=[0, 0]"], "ground_heads lists a head twice"),
    (["ground_heads=-1"], "ground_heads must be mean or a head index"),
    (["ground_heads=[]"], "ground_heads must be mean or a head index"),
])
def test_bad_selections_have_one_clear_line(extra, msg):
    with pytest.raises(RALError, match=msg):
        build_config("grounded", extra)


@pytest.mark.parametrize("extra, msg", [
    (["ground_heads=[1, 4]"], "ground_heads: head 4 is out of range: the model has 4 attention heads"),
    (["ground_layers=[7]"], "ground_layers: layer 7 is out of range"),
])
def test_selections_beyond_the_model_have_one_clear_line(tmp_path, extra, msg):
    with pytest.raises(RALError, match=msg):
        _trainer(tmp_path, "bad", "lambda_ground=1", *extra)
