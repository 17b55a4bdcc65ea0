"""The trainer end to end on a tiny real Qwen2-VL: equivalence of λ=0 with GRPO, exact resume, frozen vision,
config validation, dataset errors, NaN handling."""
import json

import pytest
import torch

from ral_core.config import build_config
from ral_core.errors import RALError
from ral_core.rewards import RewardModel, reward
from ral_core.trainer import Trainer, is_vision_param


@reward("test_mentions_digit")
def _mentions_digit(completion, sample):
    """Varies across random rollouts, so advantages are non-zero even for an untrained model."""
    return float(any(ch.isdigit() for ch in completion))


BASE = ["steps=3", "prompts_per_step=2", "group_size=4", "minibatch_size=4", "epochs=1", "max_new_tokens=4",
        "lr=5e-3", "reward_weights={test_mentions_digit: 1.0}", "temperature=1.5"]


def _cfg(tmp, name, *extra, model=None):
    return build_config(None, BASE + [f"output_dir={tmp / name}", f"model={model}"] + list(extra))


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters()}


def test_lambda_zero_is_exactly_grpo(tmp_path, tiny_model_dir):
    runs = {}
    for name, extra in [("grpo", ["log_attention=false"]), ("ral0", ["lambda_attn=0", "log_attention=true"]),
                        ("ral5", ["lambda_attn=5", "log_attention=true"])]:
        t = Trainer(_cfg(tmp_path, name, *extra, model=tiny_model_dir))
        t.train()
        runs[name] = (_params(t), [m["reward"] for m in t.history])
        assert any(m["adv_abs_mean"] > 0 for m in t.history)  # the token term really acted
    g, r0, r5 = runs["grpo"][0], runs["ral0"][0], runs["ral5"][0]
    assert all(torch.equal(g[k], r0[k]) for k in g)
    assert any(not torch.equal(g[k], r5[k]) for k in g)  # the comparison can fail


def test_vision_tower_is_frozen_and_unchanged(tmp_path, tiny_model_dir):
    t = Trainer(_cfg(tmp_path, "frozen", "steps=2", model=tiny_model_dir))
    before = _params(t)
    t.train()
    after = _params(t)
    vision = [k for k in before if is_vision_param(k)]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if not is_vision_param(k))


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in rows]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir):
    extra = ["steps=4", "lambda_attn=1", "epochs=2", "save_every=1"]
    full = Trainer(_cfg(tmp_path, "full", *extra, model=tiny_model_dir))
    full.train()

    def stop_after_two(trainer, m):
        if trainer.step == 2:
            trainer.cancel.set()
    part = Trainer(_cfg(tmp_path, "part", *extra, model=tiny_model_dir), callbacks=[stop_after_two])
    res = part.train()
    assert res["status"] == "cancelled" and res["step"] == 2
    resumed = Trainer(_cfg(tmp_path, "part", *extra, model=tiny_model_dir))
    resumed.train(resume=True)
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert _strip_times(a) == _strip_times(b)
    fa, fb = _params(full), _params(resumed)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir):
    Trainer(_cfg(tmp_path, "keep", "steps=1", model=tiny_model_dir)).train()
    with pytest.raises(RALError, match="already holds checkpoints"):
        Trainer(_cfg(tmp_path, "keep", "steps=1", model=tiny_model_dir)).train()
    assert (tmp_path / "keep" / "checkpoints" / "step-00001").is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    def poison(trainer, m):
        if trainer.step == 2:
            with torch.no_grad():
                for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters():
                    if "lm_head" in n or "embed_tokens" in n:
                        p.fill_(float("nan"))
    t = Trainer(_cfg(tmp_path, "nan", "steps=5", "save_every=1", model=tiny_model_dir), callbacks=[poison])
    with pytest.raises(RALError, match="last good checkpoint"):
        t.train()
    assert t.status == "nan"
    ck = tmp_path / "nan" / "checkpoints"
    assert (ck / "latest").read_text() == "step-00002"
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(str(ck / "step-00002" / "model.safetensors")).values())
    assert all(torch.isfinite(p).all() for p in t.acc.unwrap_model(t.model).parameters())


def test_checkpoint_loads_as_a_model(tmp_path, tiny_model_dir, task):
    from ral_core.inspection import inspect
    from ral_core.models import load_adapter
    t = Trainer(_cfg(tmp_path, "ck", "steps=1", model=tiny_model_dir))
    t.train()
    a = load_adapter(t.latest_checkpoint())
    assert inspect(a, task.sample(0).image, "What digit is in row 1 column 1?", max_new_tokens=2).n_tokens >= 1


@pytest.mark.parametrize("overrides,msg", [
    (["bogus_key=1"], "unknown config key 'bogus_key'"),
    (["lambda_atn=1"], "did you mean 'lambda_attn'"),
    (["steps=many"], "'steps' expects int"),
    (["group_size=1"], "group_size must be ≥ 2"),
    (["lr=0"], "lr must be > 0"),
    (["lr=-1e-4"], "lr must be > 0"),
    (["lambda_attn=-1"], "lambda_attn must be ≥ 0"),
    (["lambda_attn=1", "epochs=1", "minibatch_size=4096"], "exactly zero on the first update"),
    (["gamma_opad=1"], "need a teacher model"),
    (["freeze_vision=maybe"], "'freeze_vision' expects bool"),
    (["novalue"], "must look like key=value"),
])
def test_bad_configs_have_clear_messages(overrides, msg):
    with pytest.raises(RALError, match=msg.replace("(", r"\(")):
        build_config("ral", overrides)


def test_recipes_load_and_two_updates_default():
    for name in ("grpo", "ral", "opad"):
        cfg = build_config(name, ["teacher=x"] if name == "opad" else [])
        assert cfg.updates_per_step >= 2
    with pytest.raises(RALError, match="does not exist"):
        build_config("no_such_recipe")


def test_rewards_registry_and_user_reward():
    rm = RewardModel({"exact_match": 0.9, "format": 0.1})
    r, subs = rm("<answer> 7 </answer>", {"answer": "7"})
    assert r == pytest.approx(1.0) and subs == {"exact_match": 1.0, "format": 1.0}
    assert RewardModel({"number": 1})("about 3.0", {"answer": "3"})[0] == 1.0
    assert RewardModel({"choice": 1})("(B) because", {"answer": "B"})[0] == 1.0
    assert RewardModel({"iou": 1})("[0, 0, 10, 10]", {"answer": "", "boxes": [[0, 0, 10, 20]]})[0] == pytest.approx(0.5)
    assert RewardModel({"test_trainer:_mentions_digit": 1})("a 1", {"answer": ""})[0] == 1.0
    wm = RewardModel({"word_match": 1})  # partial credit: words at their own position, over the longer answer
    assert [wm(c, {"answer": "7 2 1"})[0] for c in ("7 2 1", "7 2 4", "7 2", "7 2 1 5", "1 2 7", "")] == \
        pytest.approx([1, 2 / 3, 2 / 3, 3 / 4, 1 / 3, 0])
    assert wm("<answer>Row 2 column 1.</answer>", {"answer": "row 1 column 1"})[0] == pytest.approx(3 / 4)
    with pytest.raises(RALError, match="unknown reward"):
        RewardModel({"nope": 1})
    with pytest.raises(RALError, match="cannot import reward"):
        RewardModel({"no_module_xyz:f": 1})


def test_jsonl_dataset_errors_name_the_line(tmp_path):
    from PIL import Image

    from ral_core.data.jsonl import JsonlDataset
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    good = '{"image": "a.png", "question": "q?", "answer": "1", "boxes": [[0, 0, 4, 4]]}'
    cases = {
        "missing field": (good + '\n{"image": "a.png", "question": "q?"}', "line 2: missing field(s) answer"),
        "bad json": (good + "\n{oops", "line 2: not valid JSON"),
        "missing image": ('{"image": "b.png", "question": "q", "answer": "1"}', "line 1: image file 'b.png'"),
        "bad boxes": ('{"image": "a.png", "question": "q", "answer": "1", "boxes": [[1, 2]]}', "line 1: box"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / "d.jsonl").write_text(text)
        with pytest.raises(RALError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            JsonlDataset(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text(good + "\n")
    ds = JsonlDataset(tmp_path / "d.jsonl")
    assert ds.sample(0)["boxes"] == [(0, 0, 4, 4)]


def test_train_on_user_jsonl(tmp_path, tiny_model_dir, task):
    lines = []
    for i in range(3):
        s = task.sample(i)
        s.image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": s.question, "answer": s.answer,
                                 "boxes": [list(b) for b in s.boxes]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    t = Trainer(_cfg(tmp_path, "user", "steps=1", f"dataset={tmp_path / 'data.jsonl'}", model=tiny_model_dir))
    assert t.train()["status"] == "done"
    assert "attn_target_mass" in t.history[0]


def test_lora_training_saves_an_adapter_that_loads(tmp_path, tiny_model_dir, task):
    from ral_core.inspection import inspect
    from ral_core.models import load_adapter
    t = Trainer(_cfg(tmp_path, "lora", "steps=2", "lora_r=4", "lambda_attn=1", "epochs=2", "beta=0.04",
                     model=tiny_model_dir))
    base_before = {n: p.detach().clone() for n, p in t.acc.unwrap_model(t.model).named_parameters() if "lora_" not in n}
    t.train()
    after = dict(t.acc.unwrap_model(t.model).named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in base_before.items())  # only LoRA weights train
    ck = t.latest_checkpoint()
    assert (ck / "adapter_model.safetensors").exists()
    merged = load_adapter(ck)
    assert inspect(merged, task.sample(0).image, "What digit is in row 1 column 1?", max_new_tokens=2).n_tokens >= 1
    assert "kl" in t.history[-1]


def test_opad_reads_a_deeper_teacher_at_the_same_relative_depth(tmp_path, tiny_qwen, tiny_model_dir):
    from ral_core.builders.tiny import tiny_qwen2_vl
    from ral_core.policy import matched_layers
    assert matched_layers([3], 4, 6) == [5] and matched_layers([0, 1, 2, 3], 4, 8) == [1, 3, 5, 7]
    assert matched_layers([0, 1, 2], 3, 3) == [0, 1, 2]
    deep = tiny_qwen2_vl(layers=5, tokenizer=tiny_qwen.tokenizer, seed=1)  # the student fixture has 3 layers
    d = tmp_path / "deep_teacher"
    deep.model.save_pretrained(d)
    deep.tokenizer.save_pretrained(d)
    deep.image_processor.save_pretrained(d)
    t = Trainer(_cfg(tmp_path, "opad", "gamma_opad=1", "epochs=2", "steps=1", f"teacher={d}", model=tiny_model_dir))
    assert t.spec.layers == [2] and t.teacher_spec.layers == [4]  # last ↔ last
    t.train()
    assert t.history[-1]["loss_opad_attn"] > 0


_CALLS = [0]


@reward("test_collapsing")
def _collapsing(completion, sample):
    """1 for the rollouts of the first 5 steps (2 prompts × 4 rollouts each), then 0: a run whose reward collapses."""
    _CALLS[0] += 1
    return float(_CALLS[0] <= 5 * 8)


def test_collapse_guard_warns_once_with_the_step(tmp_path, tiny_model_dir):
    _CALLS[0] = 0
    t = Trainer(_cfg(tmp_path, "collapse", "steps=11", "reward_weights={test_collapsing: 1.0}",
                     "log_attention=false", model=tiny_model_dir))
    res = t.train()
    rows = [json.loads(ln) for ln in (tmp_path / "collapse" / "metrics.jsonl").read_text().splitlines()]
    warned = [r for r in rows if r.get("warnings")]
    assert [r["step"] for r in warned] == [10]  # steps 6–10 average 0 < ½ · 1 (steps 1–5); once per run
    w = warned[0]["warnings"][0]
    assert "mean reward fell from 1.000 (steps 1–5) to 0.000 (steps 6–10)" in w and "lower learning rate" in w
    assert res["warnings"] == [w] and res["wall_time"] > 0
    assert f"step 10: {w}" in (tmp_path / "collapse" / "run.log").read_text()


def test_collapse_guard_is_silent_on_real_runs_of_the_default_model():
    """Every recorded home-regime run (default model; GRPO, RAL λ 0.5–100, OPAD, distillation; 5 seeds, 30 steps)."""
    from pathlib import Path

    from ral_core.evaluate import CollapseGuard
    records = sorted((Path(__file__).parents[1] / "bench" / "records" / "home").glob("*_s*.json"))
    assert len(records) >= 30
    for f in records:
        rec = json.loads(f.read_text())
        g, hist = CollapseGuard(rec["config"]["lr"]), []
        for row in rec["curve"]:
            hist.append(row)
            assert g.check(hist) == [], f.name


def test_collapse_guard_warns_when_a_probe_turns_wrong():
    from ral_core.evaluate import CollapseGuard
    g = CollapseGuard(lr=1e-3)
    g.probe(0, 0, "7", "7")
    g.probe(0, 1, "3", "5")
    g.probe(10, 1, " 5", "5")  # wrong → right: nothing to say
    assert g.check([]) == []
    g.probe(20, 0, "4", "7")
    (w,) = g.check([])
    assert "probe 0 was answered right at step 0 and wrong at step 20 ('4' instead of '7')" in w
    assert "lower learning rate (lr is 0.001)" in w
    g.probe(30, 1, "9", "5")
    assert g.check([]) == [] and g.warnings == [w]  # once per run


def test_collapse_guard_does_not_repeat_a_warning_the_history_holds():
    """A resumed run (or one continued in chunks) starts a fresh guard on the history it logged."""
    from ral_core.evaluate import CollapseGuard
    hist = [{"step": s, "reward": 1.0 if s <= 5 else 0.0} for s in range(1, 11)]
    (w,) = CollapseGuard(lr=1e-3).check(hist)
    hist[-1]["warnings"] = [w]
    hist.append({"step": 11, "reward": 0.0})
    assert CollapseGuard(lr=1e-3).check(hist) == []
    clean = [{"step": s, "reward": 1.0 if s <= 5 else 0.0} for s in range(1, 12)]
    assert len(CollapseGuard(lr=1e-3).check(clean)) == 1  # the same history without the logged warning


def test_ral_train_prints_the_collapse_warning_and_its_wall_time(tmp_path, tiny_model_dir, capsys):
    from ral_core.cli import main
    _CALLS[0] = 0
    out = tmp_path / "cli"
    assert main(["train", "--no-figures", *BASE, "steps=10", "reward_weights={test_collapsing: 1.0}",
                 "log_attention=false", f"model={tiny_model_dir}", f"output_dir={out}"]) == 0
    cap = capsys.readouterr()
    assert "warning (step 10): mean reward fell from 1.000" in cap.err and "try a lower learning rate" in cap.err
    assert cap.err.count("mean reward fell") == 2  # as it fires, and again after the summary
    assert "done: 10 steps in " in cap.out
