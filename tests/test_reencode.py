"""The last re-encodings of a step: each distinct image is preprocessed once (the per-row inputs and the logits are
bit-identical to processing every copy), and the reference model and the teacher reuse the step's image features
where their vision tower is the student's (same weights), or run their own tower once per distinct image."""
import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ral_core.models.base as base
from ral_core import vision_cache
from ral_core.builders.tiny import TINY_FAMILIES, tiny_adapter
from ral_core.config import build_config
from ral_core.data import GroundingTask
from ral_core.models.base import DEFAULT_MODEL_DIR
from ral_core.policy import policy_forward
from ral_core.trainer import Trainer
from ral_core.vision_cache import _encoder_owner, distinct_images, tower_fingerprint

G = 3


@pytest.fixture(scope="module")
def samples():
    return GroundingTask(kinds=("cell", "row"), split="train", seed=1).samples(3)


def _every_copy(images):
    return list(images), torch.arange(len(images))  # the old path: each row's image processed on its own


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dedupe_is_bit_identical(family, samples, monkeypatch):
    ad = tiny_adapter(family)
    ad.model.eval()
    wide = samples[1].image.resize((samples[1].image.width * 2, samples[1].image.height))
    # G copies of one object per prompt, an equal image in another object, an image of another size
    images = [s.image for s in samples for _ in range(G)] + [samples[0].image.copy(), wide]
    questions = [s.question for s in samples for _ in range(G)] + [samples[0].question, samples[1].question]
    calls = []
    process = ad.process_images
    monkeypatch.setattr(ad, "process_images", lambda ims: calls.append(len(ims)) or process(ims))
    b = ad.build_inputs(images, questions)
    assert calls == [4] and b["distinct"]["rows"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 3]
    with monkeypatch.context() as m:
        m.setattr(base, "distinct_images", _every_copy)
        ref = ad.build_inputs(images, questions)
    assert calls == [4, len(images)]
    mi, mr = b["model_inputs"], ref["model_inputs"]
    assert mi.keys() == mr.keys() and all(torch.equal(mi[k], mr[k]) for k in mi)
    assert b["prompt_lens"] == ref["prompt_lens"]
    assert all((g.boxes == h.boxes).all() and g.groups == h.groups for g, h in zip(b["geometry"], ref["geometry"]))
    with torch.no_grad():
        assert torch.equal(ad.model(**mi).logits, ad.model(**mr).logits)


def test_pixels_are_hashed_only_where_two_objects_could_be_equal(samples, monkeypatch):
    hashed = []
    key = vision_cache.image_key
    monkeypatch.setattr(vision_cache, "image_key", lambda im: hashed.append(im) or key(im))
    uniq, rows = distinct_images([s.image for s in samples for _ in range(4)])
    assert len(uniq) == 3 and rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(hashed) == 3  # same size: each object hashed once, never each copy
    hashed.clear()
    a = samples[0].image
    uniq, rows = distinct_images([a, a.resize((7, 5)), a.copy()])
    assert rows.tolist() == [0, 1, 0] and len(hashed) == 2  # the 7×5 image cannot equal the others


def _teacher_dir(tmp_path, shift: float):
    """A copy of the default model as a teacher; `shift` ≠ 0 moves its vision tower's weights."""
    d = tmp_path / f"teacher{shift}"
    shutil.copytree(DEFAULT_MODEL_DIR, d)
    w = load_file(d / "model.safetensors")
    save_file({k: v + shift if k.startswith("visual.") and v.is_floating_point() else v for k, v in w.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _trainer(tmp_path, name, extra):
    cfg = build_config("grpo", ["model=default", f"output_dir={tmp_path / name}", "steps=1", "prompts_per_step=2",
                                "group_size=4", "minibatch_size=4", "snapshot_every=0", "save_every=0",
                                "attn_metrics_every=0", "share_prompt=false"] + extra)
    return Trainer(cfg)


def _count_step(t):
    """Images through the image processor, and images through each model's vision tower, in one step."""
    processed, towers = [], {}
    process = t.adapter.process_images
    t.adapter.process_images = lambda ims: processed.append(len(ims)) or process(ims)
    models = {"student": t.model, "ref": t.ref_model, "teacher": getattr(t.teacher, "model", None)}
    hooks = [_encoder_owner(m).visual.register_forward_hook(
        lambda mod, args, kw, out, k=k: towers.setdefault(k, []).append(int(kw["grid_thw"].shape[0])),
        with_kwargs=True) for k, m in models.items() if m is not None]
    try:
        t.train_step()
    finally:
        for h in hooks:
            h.remove()
        del t.adapter.process_images
    return sum(processed), {k: sum(v) for k, v in towers.items()}


def _plain(ro):
    return dataclasses.replace(ro, vision=None, share_prompt=False)  # every row's pixels through the tower


def test_reference_model_reuses_the_step_images(tmp_path):
    t = _trainer(tmp_path, "ref", ["beta=0.04"])
    assert t.ref_model is not None and _encoder_owner(t.ref_model) is not _encoder_owner(t.model)
    assert tower_fingerprint(t.ref_model) == tower_fingerprint(t.model)  # a deep copy: the same weights
    processed, towers = _count_step(t)
    # 2 prompts × 4 rollouts: 2 distinct images, preprocessed once and encoded once for the whole step
    assert processed == 2 and towers == {"student": 2}
    ro = t.last_rollouts
    with torch.no_grad():
        assert torch.equal(ro.ref_logp, policy_forward(t.ref_model, _plain(ro), None)[0])
    assert "reference model's vision tower" not in "".join(t.notes)


def test_teacher_with_the_students_tower_reuses_it(tmp_path):
    t = _trainer(tmp_path, "same", ["gamma_opad=0.5", f"teacher={_teacher_dir(tmp_path, 0.0)}"])
    processed, towers = _count_step(t)
    assert processed == 2 and towers == {"student": 2}
    ro = t.last_rollouts
    with torch.no_grad():
        _, attn, _ = policy_forward(t.teacher.model, _plain(ro), t.teacher_spec)
    assert all(torch.equal(a, b) for a, b in zip(ro.teacher_attn, attn)) and attn
    assert not any("teacher" in n for n in t.notes)


def test_teacher_with_its_own_tower_encodes_each_image_once(tmp_path):
    t = _trainer(tmp_path, "own", ["gamma_opad=0.5", f"teacher={_teacher_dir(tmp_path, 0.01)}"])
    assert any("teacher's vision tower differs" in n for n in t.notes)
    processed, towers = _count_step(t)
    assert processed == 2 and towers == {"student": 2, "teacher": 2}  # not 8: once per distinct image
    ro = t.last_rollouts
    own = ro.vision.for_model(t.teacher.model)
    assert own is not ro.vision and not torch.equal(torch.stack(own.pooled), torch.stack(ro.vision.pooled))
    with torch.no_grad():
        _, attn, _ = policy_forward(t.teacher.model, _plain(ro), t.teacher_spec)
    assert all(torch.equal(a, b) for a, b in zip(ro.teacher_attn, attn))
