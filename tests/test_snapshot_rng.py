"""Snapshots watch a run without changing it: inspect() reseeds torch's global generator, so the trainer forks the
RNG around them, and a run's weights do not depend on snapshot_every."""
import torch

from ral_core.config import build_config
from ral_core.rewards import reward
from ral_core.trainer import Trainer


@reward("test_snapshot_digit")
def _mentions_digit(completion, sample):
    """Varies across the untrained model's rollouts: non-zero advantages, so the sampled tokens decide the update."""
    return float(any(ch.isdigit() for ch in completion))


BASE = ["reward_weights={test_snapshot_digit: 1.0}", "steps=2", "prompts_per_step=2", "group_size=4", "minibatch_size=4", "epochs=1", "max_new_tokens=4",
        "lr=5e-3", "temperature=1.5", "save_every=0", "probe_samples=1", "attn_metrics_every=0"]


def _weights(tmp_path, name, model_dir, every):
    t = Trainer(build_config(None, BASE + [f"output_dir={tmp_path / name}", f"model={model_dir}",
                                           f"snapshot_every={every}"]))
    t.train()
    return {n: p.detach().clone() for n, p in t.acc.unwrap_model(t.model).named_parameters()}, t


def test_snapshots_do_not_change_the_trained_weights(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    watched, t = _weights(tmp_path, "watched", tiny_model_dir, 1)
    assert (t.out / "snapshots" / "step-00001").is_dir()  # the snapshot really ran, after step 1's update
    assert any(m["adv_abs_mean"] > 0 for m in t.history)
    plain, _ = _weights(tmp_path, "plain", tiny_model_dir, 0)
    assert all(torch.equal(watched[k], plain[k]) for k in plain)
