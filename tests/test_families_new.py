"""What Qwen3.5 and Gemma 3 add beyond the shared geometry and capture-parity tests: Qwen3.5's softmax attention lives
only in some decoder layers (the rest are gated-DeltaNet linear attention), and Gemma 3 lets image tokens attend to each
other bidirectionally and restricts some layers to a sliding window."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ral_core.attention import capture, resolve_layers  # noqa: E402
from ral_core.cli import main  # noqa: E402
from ral_core.errors import RALError  # noqa: E402
from ral_core.inspection import InspectionResult, inspect  # noqa: E402
from ral_core.models import load_adapter  # noqa: E402
from ral_core.models.qwen3_5 import Qwen3_5Adapter  # noqa: E402
from ral_core.builders.tiny import tiny_gemma3, tiny_qwen3_5  # noqa: E402
from ral_core.trainer import matched_layers  # noqa: E402

torch.set_num_threads(1)
IMG = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 150, 3), dtype=np.uint8))
Q = "What digit is in row two column three of the image?"


@pytest.fixture(scope="module")
def qwen35():
    return tiny_qwen3_5()  # 8 layers, softmax attention in layers 3 and 7


@pytest.fixture(scope="module")
def gemma3():
    return tiny_gemma3()  # layer 0 sliding (window 8), layer 1 global; 16 image tokens


def _single(a, answer="seven"):
    return a.build_inputs([IMG], [Q], [answer])["model_inputs"]


def _eager_maps(a, mi):
    a.model.set_attn_implementation({"text_config": "eager"})
    try:
        out = a.model(**mi, output_attentions=True)
    finally:
        a.model.set_attn_implementation({"text_config": "sdpa"})
    assert len(out.attentions) == len(a.attention_layers)
    return dict(zip(a.attention_layers, out.attentions))


# ---- Qwen3.5 -------------------------------------------------------------------------------------------------------

def test_qwen3_5_lists_only_softmax_attention_layers(qwen35):
    a = qwen35
    types = a.text_config.layer_types
    assert a.num_layers == 8
    assert a.attention_layers == [i for i, t in enumerate(types) if t == "full_attention"] == [3, 7]
    assert a.resolve_layers("all") == [3, 7] and a.resolve_layers("last") == [7]
    assert a.resolve_layers(-1) == [7] and a.resolve_layers(-2) == [3] and a.resolve_layers([7, 3, 3]) == [3, 7]
    for bad in (2, [3, 4], 0):
        with pytest.raises(RALError, match=r"layer \d is a linear-attention layer .* only in layers 3, 7"):
            a.resolve_layers(bad)
    with pytest.raises(ValueError, match="out of range"):
        a.resolve_layers(8)
    with pytest.raises(ValueError, match="out of range"):
        a.resolve_layers(-3)  # only two layers to count back through
    # Non-hybrid models keep the old meaning: all layers, negative counts from the end.
    assert resolve_layers("all", 4) == [0, 1, 2, 3] and resolve_layers(-1, 4) == [3]

    mi = _single(a)
    rows = torch.tensor([[mi["input_ids"].shape[1] - 1]])
    with torch.no_grad(), capture(a.model, layers="all", rows=rows) as maps:
        a.model(**mi)
    assert sorted(maps) == [3, 7]
    with pytest.raises(RALError, match="layer 2 is a linear-attention layer"):
        with capture(a.model, layers=[2], rows=rows):
            pass
    with pytest.raises(RALError, match="layer 5 is a linear-attention layer"):
        with capture(a.model, layers="last", rows=rows, bias={5: torch.zeros(1, 1, 1, 4)}):
            pass

    res = inspect(a, IMG, Q, max_new_tokens=2)
    assert res.layers == [3, 7] and res.visual.shape[0] == 2
    assert inspect(a, IMG, Q, max_new_tokens=2, layers="last").layers == [7]
    # OPAD's depth matching counts along the attention layers: last ↔ last, first ↔ the teacher's matching depth.
    assert matched_layers([3, 7], [3, 7], [5, 11, 17, 23]) == [11, 23]
    assert matched_layers([1], 2, [3, 7]) == [7]


def test_qwen3_5_linear_attention_runs_on_cpu_and_agrees_with_itself(qwen35):
    """No flash-linear-attention / causal-conv1d here: the torch fallbacks run. Greedy generation (one token at a time
    through the recurrent state and conv cache) picks the argmax of a teacher-forced pass (chunked kernel)."""
    a = qwen35
    mi = a.build_inputs([IMG], [Q])["model_inputs"]
    with torch.no_grad():
        out = a.model.generate(**mi, min_new_tokens=6, max_new_tokens=6, do_sample=False,
                               suppress_tokens=a.suppress_token_ids, pad_token_id=a.tokenizer.pad_token_id,
                               output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, mi["input_ids"].shape[1]:]
        assert new.shape[1] == 6
        full = a.extend_inputs(mi, new, torch.ones_like(new))
        logits = a.model(**full).logits[0, mi["input_ids"].shape[1] - 1:-1]
    steps = torch.stack(out.scores, 1)[0]  # what generate chose from: raw logits with suppressed tokens at -inf
    keep = torch.isfinite(steps)
    assert torch.equal(logits.masked_fill(~keep, float("-inf")).argmax(-1), new[0])
    assert (logits[keep] - steps[keep]).abs().max() < 1e-4


def test_qwen3_5_gradients_as_accurate_as_eager(qwen35):
    """The decay parameters of the gated-DeltaNet layers make fp32 gradients noisy (test_capture allows 1e-3 there):
    against an fp64 eager reference, capture's fp32 gradients are as accurate as eager's own fp32 gradients."""
    a = qwen35
    mi = _single(a)  # unpadded: eager in fp64 turns fully masked pad rows into NaN
    L = mi["input_ids"].shape[1]
    vis = torch.nonzero(a.visual_mask(mi["input_ids"][0])).flatten()
    rows = torch.tensor([[int(vis[len(vis) // 2]), int(vis[-1]) + 1, L - 2, L - 1]])
    idx = rows[:, None, :, None]
    g = torch.Generator().manual_seed(1)
    weights = {l: torch.randn(1, a.num_heads, rows.shape[1], L, generator=g) for l in a.attention_layers}

    def grads(maps, dtype):
        a.model.zero_grad(set_to_none=True)
        sum((maps[l] * weights[l].to(dtype)).sum() for l in maps).backward()
        out = {n: p.grad.detach().double() for n, p in a.model.named_parameters() if p.grad is not None}
        a.model.zero_grad(set_to_none=True)
        return out

    def eager_rows():
        return {l: m.gather(2, idx.expand(1, m.shape[1], rows.shape[1], L)) for l, m in _eager_maps(a, mi).items()}

    g_eager = grads(eager_rows(), torch.float32)
    with capture(a.model, layers="all", rows=rows) as maps:
        a.model(**mi)
    g_cap = grads(dict(maps), torch.float32)
    try:
        a.model.double()
        mi = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in mi.items()}
        g_64 = grads(eager_rows(), torch.float64)
    finally:
        a.model.float()
    floor = 1e-4 * max(v.abs().max().item() for v in g_64.values())

    def worst(gr):
        return max((gr[n] - g_64[n]).abs().max().item() / max(g_64[n].abs().max().item(), floor) for n in g_64)

    e_eager, e_cap = worst(g_eager), worst(g_cap)
    print(f"relative gradient error vs fp64 eager: eager fp32 {e_eager:.2e}, capture fp32 {e_cap:.2e}")
    assert e_cap <= max(2 * e_eager, 1e-5)


def test_ral_inspect_cli_on_a_saved_qwen3_5(qwen35, tmp_path, capsys):
    d = tmp_path / "qwen3_5"
    for part in (qwen35.model, qwen35.tokenizer, qwen35.image_processor):
        part.save_pretrained(d)
    b = load_adapter(str(d))
    assert type(b) is Qwen3_5Adapter and b.attention_layers == [3, 7]
    IMG.save(tmp_path / "img.png")
    args = ["inspect", "--image", str(tmp_path / "img.png"), "--question", Q, "--model", str(d),
            "--max-new-tokens", "3"]
    capsys.readouterr()
    assert main(args + ["--head", "1", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "layer 7 attention mass" in printed  # the default --layer -1 is the last softmax-attention layer
    for f in ("overlay.png", "heads.png", "head1.png", "answer.txt", "result/result.json"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    res = InspectionResult.load(tmp_path / "out" / "result")
    assert res.layers == [3, 7] and res.visual.shape[:2] == (2, qwen35.num_heads)
    np.testing.assert_allclose(res.mass.sum(-1), 1.0, atol=1e-5)

    assert main(args + ["--layer", "3", "--out", str(tmp_path / "out3")]) == 0
    assert "layer 3 attention mass" in capsys.readouterr().out
    assert main(args + ["--layer", "2", "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "linear-attention layer" in err and "3, 7" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---- Gemma 3 -------------------------------------------------------------------------------------------------------

def test_gemma3_capture_keeps_image_block_and_sliding_window(gemma3):
    """Every row of both layers: capture equals eager, and the keys it attends to are exactly the ones Gemma 3
    allows: causal, plus every token of the same image (bidirectional), cut to the window in sliding layers."""
    a = gemma3
    types = a.text_config.layer_types
    assert types == ["sliding_attention", "full_attention"] and a.attention_layers == [0, 1]
    mi = _single(a)
    L, w = mi["input_ids"].shape[1], a.text_config.sliding_window
    vis = a.visual_mask(mi["input_ids"][0])
    assert L > 3 * w and int(vis.sum()) == 16 > w  # the window cuts into the image block and the text
    with torch.no_grad():
        with capture(a.model, layers="all", rows=None) as maps:
            a.model(**mi)
        ref = _eager_maps(a, mi)
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (k <= q) | (vis[:, None] & vis[None, :])
    for layer, kind in enumerate(types):
        cap = maps[layer][0]  # [H, L, L]
        err = (cap - ref[layer][0].float()).abs().max().item()
        print(f"gemma3 {kind}: max |capture - eager| over all {L} rows = {err:.2e}")
        assert err <= 1e-6
        expect = allowed & (k > q - w) if kind == "sliding_attention" else allowed
        assert torch.equal(cap > 0, expect[None].expand_as(cap))
    first = int(torch.nonzero(vis)[0])
    assert (maps[1][0, :, first, first + 1:first + 16] > 0).all()  # an image's first token sees its last


def test_gemma3_without_the_image_mask_differs(gemma3):
    """The image-block mask changes the model (so keeping it matters): without `token_type_ids` Gemma 3 is causal."""
    a = gemma3
    mi = _single(a)
    vis = a.visual_mask(mi["input_ids"][0])
    first = int(torch.nonzero(vis)[0])
    with torch.no_grad():
        with capture(a.model, layers="all", rows=None) as kept:
            a.model(**mi)
        with capture(a.model, layers="all", rows=None) as causal:
            a.model(**{k: v for k, v in mi.items() if k != "token_type_ids"})
    assert (causal[1][0, :, first, first + 1:] == 0).all() and (kept[1][0, :, first, first + 1:first + 16] > 0).all()
    assert a.build_inputs([IMG], [Q])["model_inputs"]["token_type_ids"].sum() == 16


@pytest.mark.parametrize("family", ["qwen3_5", "gemma3"])
def test_one_ral_step_with_two_updates(family, tmp_path, qwen35, gemma3):
    """The trainer's rollout (grouped sampling, caches of linear-attention / sliding layers) and RAL term run, reading
    the last softmax-attention layer."""
    from ral_core.config import build_config
    from ral_core.trainer import Trainer

    a = {"qwen3_5": qwen35, "gemma3": gemma3}[family]
    d = tmp_path / "model"
    for part in (a.model, a.tokenizer, a.image_processor):
        part.save_pretrained(d)
    cfg = build_config(None, ["steps=1", "prompts_per_step=2", "group_size=4", "minibatch_size=4", "epochs=2",
                              "max_new_tokens=4", "lr=5e-3", "temperature=1.5", "lambda_attn=1",
                              f"output_dir={tmp_path / 'run'}", f"model={d}"])
    t = Trainer(cfg)
    assert t.spec.layers == [a.attention_layers[-1]]
    t.train()
    m = t.history[-1]
    assert np.isfinite(m["loss_ral_attn"]) and 0 < m["attn_visual_mass"] < 1
