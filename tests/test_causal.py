"""Causal checks (ral_core/causal.py) against hand-made computations on a tiny model of every family: the batched
head knock-out through the attention function equals one forward per head with the head's slice zeroed by a
forward pre-hook on its output projection; region blocking through the logits bias equals an explicit mask in
eager attention; sinks are found on constructed cases; records round-trip without the model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchhelpers import bench_module  # noqa: E402

from ral_core import causal  # noqa: E402
from ral_core.attention import decoder_attention_modules  # noqa: E402
from ral_core.builders.tiny import TINY_FAMILIES, tiny_adapter  # noqa: E402
from ral_core.errors import RALError  # noqa: E402

torch.set_num_threads(1)
TOL = 2e-5  # |Δ log p|: batched through SDPA vs hooked one by one (measured ≤ 5e-7 on every family)
QUESTION = "What digit is in row two column three?"


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def case(request):
    a = tiny_adapter(request.param)
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    ids = a.encode_answer("seven two", eos=False)
    return a, im, ids


def _plain_logp(a, im, ids, hooks=()):
    s = causal._prepare(a, im, QUESTION, ids)
    try:
        with torch.no_grad():
            return causal._answer_logp(a.model, s.inputs, ids)[0]  # pixels in the inputs, no cached features
    finally:
        for h in hooks:
            h.remove()


def test_knockout_equals_hooked_reference(case):
    a, im, ids = case
    a.model.set_attn_implementation({"text_config": "sdpa"})
    ko = causal.knockout(a, im, QUESTION, ids, chunk=3)  # chunks of 3 cross layer boundaries
    H, layers = a.num_heads, a.attention_layers
    assert ko.layers == layers and ko.delta.shape == (len(layers), H, len(ids))
    assert ko.forwards == 1 + -(-len(layers) * H // 3) and ko.naive_forwards == 1 + len(layers) * H
    base = _plain_logp(a, im, ids)
    assert np.abs(ko.base_logp - base.double().numpy()).max() <= TOL
    ref = bench_module("causal_bench").naive_grid(a, im, QUESTION, ids)[0]  # the hand-made loop the bench times
    err = np.abs(ko.delta - ref).max()
    print(f"{a.name}: max |knock-out - hooked reference| = {err:.1e}, largest effect {np.abs(ref).max():.3f}, "
          f"shared prefix: {ko.shared_prefix}")
    assert np.abs(ref).max() > 1e-3  # the heads do matter in these random models: the comparison is not vacuous
    assert err <= TOL
    # the layers before a chunk's first knocked-out layer ran once, except in Qwen3-VL, whose deepstack adds the
    # visual features inside the first layers through batch-1 masks (every row from the input there)
    assert ko.shared_prefix == (a.model.config.model_type != "qwen3_vl")
    assert not causal.knockout(a, im, QUESTION, ids, layers="last", share_prefix=False).shared_prefix


def _eager_blocked_logp(a, s, layers, block):
    """Eager attention with the block written into each chosen layer's additive mask by a pre-hook."""
    a.model.set_attn_implementation({"text_config": "eager"})
    mods = decoder_attention_modules(a.model)

    def pre(_m, args, kwargs):
        m = kwargs.get("attention_mask")
        L = block.shape[-1]
        if m is None:
            m = torch.zeros(1, 1, L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        kwargs["attention_mask"] = m.masked_fill(block, torch.finfo(m.dtype).min)
        return args, kwargs
    hooks = [mods[l].register_forward_pre_hook(pre, with_kwargs=True) for l in layers]
    try:
        with torch.no_grad():
            return causal._answer_logp(a.model, s.inputs, s.ids)[0]
    finally:
        for h in hooks:
            h.remove()
        a.model.set_attn_implementation({"text_config": "sdpa"})


def test_blocking_equals_eager_mask_reference(case):
    a, im, ids = case
    box = [0, 0, 60, 90]  # the left half of the 120×90 image
    layers = a.attention_layers
    b = causal.block_region(a, im, QUESTION, ids, [box], layers="all", max_new_tokens=4)
    s = causal._prepare(a, im, QUESTION, ids)
    L = s.inputs["input_ids"].shape[1]
    vis = torch.nonzero(a.visual_mask(s.inputs["input_ids"][0])).flatten()
    geo = a.geometry(im)
    inside = np.flatnonzero(np.asarray(geo.boxes)[:, 0] < 60)  # tokens that see any of the left half
    assert b.blocked_tokens == inside.tolist() and 0 < len(inside) < geo.n_tokens
    block = torch.zeros(1, 1, L, L, dtype=torch.bool)
    block[0, 0, s.P - 1:, vis[inside]] = True
    ref = _eager_blocked_logp(a, s, layers, block) - _plain_logp(a, im, ids)
    err = np.abs(b.delta - ref.double().numpy()).max()
    print(f"{a.name}: max |blocking - eager mask| = {err:.1e}, effect {np.abs(ref).max():.3f}")
    assert np.abs(ref.numpy()).max() > 1e-4
    assert err <= TOL
    assert b.answer == "seven two" and isinstance(b.new_answer, str) and len(b.new_answer_ids) <= 4


def test_unblocked_greedy_loop_equals_generate(case):
    """The block's decoding loop without a block answers what `generate` answers (same suppressed tokens, EOS)."""
    from ral_core.generation import generate_answer, strip_answer

    a, im, ids = case
    s = causal._prepare(a, im, QUESTION, ids)
    vis = torch.nonzero(a.visual_mask(s.inputs["input_ids"][0])).flatten()
    mine = causal.greedy_blocked(a, s, vis, np.array([], dtype=int), a.attention_layers, 6)
    gen = strip_answer(generate_answer(a, s.prompt, 6)[0].tolist(), set(a.eos_token_ids))
    gen = [t for t in gen if t not in a.eos_token_ids]
    assert mine == gen


def test_block_refuses_bad_boxes(case):
    a, im, ids = case
    for box, msg in (([0, 0, 500, 10], "outside"), ([10, 10, 5, 20], "empty"), ([], "give a box")):
        with pytest.raises(RALError, match=msg):
            causal.block_region(a, im, QUESTION, ids, box)


def _result(visual, n_tokens=2):
    from ral_core.inspection import InspectionResult
    from ral_core.models.base import TokenGeometry, grid_boxes

    nL, H, R, Nv = visual.shape
    side = int(np.sqrt(Nv))
    return InspectionResult(model_name="constructed", question="q", answer="a b", answer_tokens=["a", "b"][:n_tokens],
                            answer_ids=[1, 2][:n_tokens], prompt_tokens=["q"], layers=list(range(nL)), num_heads=H,
                            visual=visual, mass=np.zeros((nL, H, R, 3), np.float32),
                            image=Image.new("RGB", (side * 10, side * 10)),
                            geometry=TokenGeometry((side * 10, side * 10), grid_boxes(side, side, 10, 10),
                                                   [{"start": 0, "rows": side, "cols": side}]))


def test_sinks_on_a_constructed_case():
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 0.02, (2, 4, 3, 16)).astype(np.float32)  # 2 layers, 4 heads, rows P-1..P+1, 4×4 tokens
    v[:, :3, :, 5] = 0.6       # token 5 takes most of 6 of the 8 heads' rows: a sink
    v[0, 0, :, 9] = 0.45       # token 9 is strong in one head only: a focused head, not a sink
    v[1, 3, :2, 12] = 0.9      # token 12 only in the answer's predicting rows of one head
    s = causal.detect_sinks(_result(v))
    assert s.tokens == [5]
    assert s.share[5] == pytest.approx(6 / 8) and s.share[9] == pytest.approx(1 / 8)
    assert causal.detect_sinks(_result(v), min_share=0.1).tokens == [5, 9, 12]
    m = _result(v).visual_map()
    clean = causal.without_sinks(m, s)
    assert clean[5] == 0 and clean.sum() == pytest.approx(m.sum())
    others = np.delete(np.arange(16), 5)
    assert np.allclose(clean[others] / clean[others].sum(), m[others] / m[others].sum())
    with pytest.raises(RALError, match="ε"):
        causal.detect_sinks(_result(v), eps=1.5)


def test_sink_made_by_a_bias_is_found():
    """A real model whose answer rows are biased toward one visual key in every layer: that key is flagged."""
    from ral_core.inspection import inspect

    a = tiny_adapter("qwen2_vl")
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    b = a.build_inputs([im], [QUESTION])["model_inputs"]
    vis = torch.nonzero(a.visual_mask(b["input_ids"][0])).flatten()
    bias = torch.zeros(1, 1, 1, b["input_ids"].shape[1])
    bias[..., vis[3]] = 12.0
    res = inspect(a, im, QUESTION, max_new_tokens=3, forced_answer="seven",
                  bias={l: bias for l in a.attention_layers})
    assert causal.detect_sinks(res).tokens == [3]
    assert causal.detect_sinks(inspect(a, im, QUESTION, max_new_tokens=3, forced_answer="seven")).tokens == []


def test_record_round_trip_without_the_model(tmp_path, case):
    a, im, ids = case
    if a.family != "qwen2_vl":
        pytest.skip("one family is enough for the file format")
    from ral_core.inspection import inspect
    res = inspect(a, im, QUESTION, max_new_tokens=3, forced_answer="seven two")
    c = causal.run_checks(a, res, im, boxes=[(0, 0, 60, 45)], chunk=4, max_new_tokens=3)
    res.save(tmp_path / "r")
    c.save(tmp_path / "r")
    back = causal.CausalResult.load(tmp_path / "r")
    assert np.array_equal(back.knockout.delta, c.knockout.delta) and back.knockout.layers == c.knockout.layers
    assert back.blocks[0].line() == c.blocks[0].line() and back.sinks.tokens == c.sinks.tokens
    assert back.knockout.ranked(n=1)[0] == c.knockout.ranked(n=1)[0]
    assert back.knockout.cell(*back.knockout.ranked(n=1)[0][:2]) == back.knockout.ranked(n=1)[0][2]
    with pytest.raises(RALError, match="ral causal"):
        causal.CausalResult.load(tmp_path)


def test_head_scale_of_one_changes_nothing(case):
    a, im, ids = case
    from ral_core.attention import capture
    s = causal._prepare(a, im, QUESTION, ids)
    with torch.no_grad():
        plain = causal._answer_logp(a.model, s.batch(2), ids)
        with capture(a.model, layers=[], head_scale={l: torch.ones(2, a.num_heads) for l in a.attention_layers}):
            scaled = causal._answer_logp(a.model, s.batch(2), ids)
    assert torch.equal(plain, scaled)


def test_figures_from_the_saved_record(tmp_path):
    """The knock-out grid, a head's map with its effect, sinks and blocking draw from saved data alone."""
    from ral_core import render
    from ral_core.inspection import InspectionResult, inspect

    a = tiny_adapter("qwen2_vl")
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    res = inspect(a, im, QUESTION, max_new_tokens=3, forced_answer="seven two")
    causal.run_checks(a, res, im, boxes=[(0, 0, 28, 56)], max_new_tokens=3).save(res.save(tmp_path / "r"))
    res, c = InspectionResult.load(tmp_path / "r"), causal.CausalResult.load(tmp_path / "r")
    ko = c.knockout
    figs = [render.knockout_grid(ko, highlight=(ko.layers[0], 1)), render.knockout_grid(ko, token=1),
            render.head_effect_overlay(res, ko, ko.layers[-1], 2, sinks=c.sinks, clean=True),
            render.sink_overlay(res, causal.Sinks([4], np.zeros(res.geometry.n_tokens), 0.3, 0.5), clean=True),
            render.blocking_overlay(res, c.blocks[0])]
    assert f"{ko.cell(ko.layers[-1], 2):+.4f}" in figs[2].axes[0].get_title()
    assert "1 sink token(s) outlined" in figs[3].axes[0].get_title()
    for i, f in enumerate(figs):
        assert render.save_figure(f, tmp_path / f"f{i}.png").stat().st_size > 1000


def test_cli_writes_grid_csv_and_rerenders_without_the_model(tmp_path, capsys):
    import csv
    from pathlib import Path

    from ral_core.cli import main

    a = tiny_adapter("qwen2_vl")
    ex = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_cell.png"
    args = ["causal", "--image", str(ex), "--question", "What digit is in row 2 column 1?", "--max-new-tokens", "3",
            "--chunk", "3", "--lens", "last", "--out", str(tmp_path / "o")]
    assert main(args, adapter=a) == 0
    out = capsys.readouterr().out
    assert "knock-out grid: 2 layers × 4 heads in 4 forwards (one per head: 9)" in out
    assert "box 0,28,28,56" in out  # the bundled example's target box, blocked by default
    rows = list(csv.DictReader(open(tmp_path / "o" / "knockout.csv")))
    assert len(rows) == 8 and [int(r["rank"]) for r in rows] == list(range(1, 9))
    assert float(rows[0]["delta_logp_mean"]) == min(float(r["delta_logp_mean"]) for r in rows)
    for f in ("knockout.png", "sinks.png", "sinks_clean.png", "blocking.png", "lens_layer1.png", "result/causal.json"):
        assert (tmp_path / "o" / f).is_file()
    assert main(["causal", "--from", str(tmp_path / "o" / "result"), "--token", "1", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "knockout.png").is_file() and (tmp_path / "r" / "lens_layer1.png").is_file()
    capsys.readouterr()
    for bad, msg in ((["--layers", "two"], "--layers must be"), (["--box", "1,2,3"], "--box must be four numbers"),
                     (["--box", "0,0,500,5"], "outside"), (["--chunk", "0"], "--chunk must be at least 1"),
                     (["--lens", "9"], "out of range")):
        assert main(args + bad, adapter=a) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert main(["causal", "--out", str(tmp_path / "x")], adapter=a) == 2
    assert "give --image and --question" in capsys.readouterr().err
    assert main(["causal", "--from", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a saved inspection result" in capsys.readouterr().err


def test_compare_ranks_heads_by_attention_moved_and_by_knockout_change():
    from ral_core.compare import compare

    a, b = tiny_adapter("qwen2_vl"), tiny_adapter("qwen2_vl", seed=1)
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    cmp = compare(a, b, im, QUESTION, max_new_tokens=3)
    ids = cmp.a.answer_ids
    ka, kb = causal.knockout(a, im, QUESTION, ids), causal.knockout(b, im, QUESTION, ids)
    layer = a.attention_layers[-1]
    rows = causal.heads_moved_and_mattered(cmp, ka, kb, layer)
    i = ka.layers.index(layer)
    change = np.abs(kb.effect()[i] - ka.effect()[i])
    assert [r["head"] for r in rows] == np.argsort(-change, kind="stable").tolist()
    assert [r["rank_effect_change"] for r in rows] == [1, 2, 3, 4]
    moved = cmp.ranked_heads(layer)
    assert sorted(rows, key=lambda r: r["rank_moved"])[0]["head"] == moved[0][0]
    assert all(r["jsd"] == pytest.approx(dict(moved)[r["head"]]) for r in rows)
    assert rows[0]["knockout_change"] == pytest.approx(change.max()) and change.max() > 0
    with pytest.raises(RALError, match="different answers"):
        causal.heads_moved_and_mattered(cmp, ka, causal.knockout(b, im, QUESTION, ids + ids[:1]), layer)


def test_cli_compare_ranks_heads_by_knockout_change(tmp_path, tiny_model_dir, capsys):
    import csv

    from ral_core.cli import main

    ex = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(ex)
    d = str(tiny_model_dir)
    assert main(["compare", d, d, "--image", str(ex), "--question", QUESTION, "--max-new-tokens", "3", "--knockout",
                 "--out", str(tmp_path / "o")]) == 0
    assert "heads whose knock-out effect changed most" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "o" / "heads_causal.csv")))
    assert len(rows) == 4 and all(float(r["knockout_change"]) == 0 for r in rows)  # the same model twice
    assert all(float(r["knockout_a"]) == float(r["knockout_b"]) for r in rows)


def test_logit_lens_last_layer_is_the_models_own_prediction(case):
    """At the last layer the lens is the model's next-token distribution at the visual positions (norm and head as the
    model applies them); earlier layers give one word per patch too."""
    a, im, _ = case
    lens = causal.logit_lens(a, im, QUESTION)
    mi = a.build_inputs([im], [QUESTION])["model_inputs"]
    vis = a.visual_mask(mi["input_ids"][0])
    with torch.no_grad():
        logits = a.model(**mi, logits_to_keep=0).logits[0, vis].float()
    p, t = torch.softmax(logits, -1).max(-1)
    n = a.num_layers
    assert lens.layers == list(range(n)) and lens.top_ids.shape == (n, int(vis.sum()))
    assert np.array_equal(lens.top_ids[-1], t.numpy())
    assert np.allclose(lens.top_prob[-1], p.double().numpy(), atol=1e-5)
    assert len(lens.words[0]) == int(vis.sum()) and all(isinstance(w, str) for w in lens.words[0])
    assert causal.logit_lens(a, im, QUESTION, layers=[-1]).layers == [n - 1]
    with pytest.raises(RALError, match="out of range"):
        causal.logit_lens(a, im, QUESTION, layers=[n])


def test_knockout_stops_at_the_requests_time_limit():
    from ral_core.limits import deadline

    a = tiny_adapter("qwen2_vl")
    im = Image.fromarray(np.random.default_rng(5).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    with deadline(1e-9), pytest.raises(RALError, match="knock-out grid took longer"):
        causal.knockout(a, im, QUESTION, a.encode_answer("seven", eos=False))


def test_app_causal_endpoints(tmp_path_factory, tiny_model_dir):
    """The Inspect panel and the Compare ranking over the app's API: knock-out grid, blocking of the example's box,
    a redraw without a picked cell (no change), and Compare's heads ranked by knock-out change; bad input one line."""
    from pathlib import Path

    from gradio_client import Client, handle_file

    from apphelpers import served_app

    ex = Path(__file__).resolve().parents[1] / "assets" / "examples" / "grid3_row.png"
    with served_app(tmp_path_factory.mktemp("causal_app"), tiny_model_dir) as url:
        c = Client(url, verbose=False)
        assert c.predict("tiny-a", handle_file(ex), "Read row 1.", 3, False, 1.0, "last", "predicts",
                         api_name="/inspect")[0] == ""
        status, grid, summary, blocking = c.predict("", "0", "mean", api_name="/causal")
        assert status == "" and Path(grid).stat().st_size > 1000 and Path(blocking).stat().st_size > 1000
        assert "forwards" in summary and "**Blocking:**" in summary and "layer(s) 0)" in summary
        assert c.predict("9,9", "all", "mean", api_name="/causal")[0].startswith("⚠️ the target box must be four")
        assert c.predict("", "two", "mean", api_name="/causal")[0].startswith("⚠️ the layers to block must be")
        assert c.predict("mean", False, api_name="/causal_cell")[0] == ""
        assert c.predict("tiny-a", "tiny-a", handle_file(ex), "Read row 1.", 3, False, 1.0, "last", "predicts",
                         api_name="/compare")[0] == ""
        status, ranking = c.predict("tiny-a", "tiny-a", "last", "mean", api_name="/compare_knockout")
        assert status == "" and [r[0] for r in ranking["data"]] == [1, 2, 3, 4]
        assert all(r[4] == 0 for r in ranking["data"])  # the same model twice: no knock-out effect changed
        refused = c.predict("tiny-a", "default", "last", "mean", api_name="/compare_knockout")[0]
        assert refused.startswith("⚠️") and "press Compare again" in refused


def test_knockout_without_cached_image_features_equals_the_cached_path(monkeypatch):
    """A family whose features cannot be handed back runs every row with its own pixels: the same grid."""
    from ral_core.vision_cache import VisionCache

    a = tiny_adapter("qwen2_5_vl")
    im = Image.fromarray(np.random.default_rng(6).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    ids = a.encode_answer("seven two", eos=False)
    cached = causal.knockout(a, im, QUESTION, ids)

    def refuse(*_a, **_k):
        raise ValueError("no features")
    monkeypatch.setattr(VisionCache, "encode", classmethod(refuse))
    assert causal._prepare(a, im, QUESTION, ids).vision is None
    plain = causal.knockout(a, im, QUESTION, ids)
    assert np.abs(plain.delta - cached.delta).max() <= TOL
