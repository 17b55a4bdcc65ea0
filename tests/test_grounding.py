"""Grounded attention: box → visual-token masks on every family, the box target, the SAYO attention reward by hand,
and the one-line messages for bad boxes."""
import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402

from ral_core.errors import RALError  # noqa: E402
from ral_core.grounding import (attention_reward, box_target, box_weights, check_boxes, mean_rows,  # noqa: E402
                                parse_boxes, rollout_weights, sink_share, target_divergence, visual_rows)
from ral_core.models.base import TokenGeometry, grid_boxes  # noqa: E402
from test_geometry import BUILDERS, token_response, _adapter  # noqa: E402

torch.set_num_threads(1)


def _slack(a) -> float:
    # one NEAREST resize maps pixel centres exactly (one original pixel of rounding); Idefics3 chains two resizes
    return 1.5 if a.family == "idefics3" else 1.0


@pytest.mark.parametrize("size", [(150, 97), (83, 131)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_box_mask_is_what_the_tokens_see(name, size):
    """Fill a box: every token whose rectangle lies inside it responds, and no token outside it does — on the
    processor's real pixels, through merged patches (Qwen), tiles + global image (Idefics3/SmolVLM), crops and pads
    (LLaVA) and pooling (Gemma 3)."""
    a = copy.copy(_adapter(name))
    a.image_processor = copy.deepcopy(a.image_processor)
    a.image_processor.resample = PILImageResampling.NEAREST
    W, H = size
    box = [round(0.2 * W), round(0.25 * H), round(0.8 * W), round(0.8 * H)]
    blank = Image.new("RGB", size, 0)
    geo = a.geometry(blank)
    img = blank.copy()
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    r = token_response(a, a.process_images([blank])["tensors"], a.process_images([img])["tensors"])
    seen = set(torch.nonzero(r > 0).flatten().tolist())
    s = _slack(a)
    inner = set(np.flatnonzero(box_weights(geo, [[box[0] + s, box[1] + s, box[2] - s, box[3] - s]]) >= 1 - 1e-9))
    outer = set(np.flatnonzero(box_weights(geo, [[box[0] - s, box[1] - s, box[2] + s, box[3] + s]]) > 0))
    assert inner, "the box should cover at least one token fully"
    assert inner <= seen <= outer, (sorted(inner - seen), sorted(seen - outer))
    w = box_weights(geo, [box])
    assert set(np.flatnonzero(w > 0)) <= outer and inner <= set(np.flatnonzero(w >= 1 - 1e-9)) | inner


def test_box_weights_union_is_exact():
    """Overlapping boxes: each token's covered fraction equals a fine rasterisation of the union."""
    geo = TokenGeometry((60, 40), grid_boxes(4, 6, 10, 10))
    boxes = [[5, 5, 32, 22], [20, 12, 47, 37], [44, 0, 60, 7]]
    w = box_weights(geo, boxes)
    ys, xs = np.mgrid[0:40:0.25, 0:60:0.25] + 0.125
    inside = np.zeros_like(xs, bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    for k, (x0, y0, x1, y1) in enumerate(geo.boxes):
        cell = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        assert w[k] == pytest.approx(inside[cell].mean(), abs=1e-9)


def test_box_target_is_a_smoothed_distribution():
    geo = TokenGeometry((90, 90), grid_boxes(3, 3, 30, 30))
    box = [[30, 30, 60, 60]]  # the centre token
    hard = box_target(geo, box, smooth=0)
    assert hard.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    soft = box_target(geo, box, smooth=0.25)
    assert soft.sum() == pytest.approx(1) and soft.argmax() == 4 and soft[4] > 0.5
    assert soft[1] == pytest.approx(soft[3]) == pytest.approx(soft[5]) == pytest.approx(soft[7])
    assert soft[0] < soft[1]  # corners get less than edges: the blur is a 2-D Gaussian over the exact rectangles
    # σ → 0 recovers the hard target
    np.testing.assert_allclose(box_target(geo, box, smooth=1e-3), hard, atol=2e-3)
    assert box_target(geo, [], smooth=0.5).sum() == 0


@pytest.mark.parametrize("boxes, msg", [
    ([[10, 10, 5, 20]], "is empty"),
    ([[10, 10, 10, 20]], "is empty"),
    ([[0, 0, 90, 30]], "outside the 84×84 image"),
    ([[-1, 0, 20, 20]], "outside the 84×84 image"),
    ([[0, 0, 20]], "must be 4 numbers"),
    ([["a", 0, 20, 20]], "must be 4 numbers"),
    ([[0, 0, float("nan"), 20]], "non-finite"),
    ("0,0,1,1", "list of [x0, y0, x1, y1]"),
])
def test_bad_boxes_get_one_line(boxes, msg):
    with pytest.raises(RALError) as e:
        check_boxes(boxes, (84, 84), where="data.jsonl line 3")
    text = str(e.value)
    assert msg in text and text.startswith("data.jsonl line 3: ") and "\n" not in text


def test_one_box_or_many():
    assert parse_boxes([1, 2, 3, 4]) == [(1.0, 2.0, 3.0, 4.0)]
    assert parse_boxes([[1, 2, 3, 4], [0, 0, 5, 5]]) == [(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 5.0, 5.0)]
    assert parse_boxes(None) == [] and parse_boxes([]) == []


def test_attention_reward_equals_hand_computation():
    """Two sequences, two heads, three generated tokens (the last one masked), keys: 2 text + 4 visual."""
    g = torch.Generator().manual_seed(0)
    raw = torch.rand((2, 2, 3, 6), generator=g)
    attn = raw / raw.sum(-1, keepdim=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    visual = torch.tensor([[0, 0, 1, 1, 1, 1]] * 2, dtype=torch.bool)
    weights = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0.5, 1, 0]])
    r = attention_reward(mean_rows([attn], mask), visual, weights)
    for i in range(2):
        toks = [t for t in range(3) if mask[i, t]]
        abar = [sum((attn[i, 0, t, k] + attn[i, 1, t, k]) / 2 for t in toks) / len(toks) for k in range(6)]
        w = weights[i].tolist()
        a = sum(w[k] * abar[k] for k in range(6)) / sum(w)
        v = sum(abar[2:]) / 4
        expect = 0.5 * (1 + math.tanh(math.log((a + 1e-6) / (v + 1e-6))))
        assert float(r[i]) == pytest.approx(expect, rel=1e-5)
    # no box: 0; attention all on the box: → 1; none on it: → 0
    assert float(attention_reward(mean_rows([attn], mask), visual, torch.zeros(2, 6))[0]) == 0
    onbox = torch.zeros(1, 6)
    onbox[0, 2] = 1
    assert float(attention_reward(onbox, visual[:1], torch.tensor([[0, 0, 1, 0, 0, 0.]]))) > 0.9
    assert float(attention_reward(onbox, visual[:1], torch.tensor([[0, 0, 0, 1, 0, 0.]]))) < 1e-6


def test_rollout_weights_rewarded_and_advantage():
    rewards = torch.tensor([1., 0., 1., 1., 0., 0.])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    A = torch.tensor([0.7, -0.7, 0., 0., 0., 0.])
    assert rollout_weights(rewards, A, group).tolist() == [1, 0, 1, 1, 0, 0]  # all-right group counts, all-wrong not
    assert rollout_weights(rewards, A, group, "advantage").tolist() == pytest.approx(A.tolist())
    with pytest.raises(RALError, match="ground_on"):
        rollout_weights(rewards, A, group, "everything")


def test_target_divergence_gradient_pulls_toward_the_box():
    """One gradient step on KL(q ‖ p_vis) raises the visual attention's mass on the box (and is not zero at the
    start, unlike RAL's JSD to the old policy)."""
    logits = torch.zeros((1, 1, 2, 5), requires_grad=True)
    visual = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)
    q = torch.tensor([[0, 0, 1., 0, 0]])
    for div in ("kl", "jsd"):
        p = visual_rows([torch.softmax(logits, -1)], visual)
        d = target_divergence(p, q, div).mean()
        (g,) = torch.autograd.grad(d, logits)
        assert g.abs().sum() > 0
        p2 = visual_rows([torch.softmax(logits.detach() - g, -1)], visual)
        assert float(p2[0, 0, 2]) > float(p[0, 0, 2].detach())


def test_sink_share_reads_the_first_real_key():
    attn = torch.tensor([[[[0.0, 0.6, 0.4], [0.0, 0.2, 0.8]]], [[[0.5, 0.5, 0.0], [0.1, 0.9, 0.0]]]])
    am = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert sink_share([attn], am, torch.ones(2, 2, dtype=torch.bool)) == pytest.approx((0.6 + 0.2 + 0.5 + 0.1) / 4)


@pytest.mark.parametrize("kind", ["cell", "row", "where"])
def test_grounding_task_boxes_per_question_type(kind):
    from ral_core.data.grounding import GroundingTask
    task = GroundingTask(kinds=(kind,), split="test")
    for s in task.samples(6):
        boxes = check_boxes(s.boxes, s.image.size)
        assert boxes
        if kind == "cell":
            assert len(boxes) == 1
        if kind == "row":
            assert len(boxes) == 3 and len({b[1] for b in boxes}) == 1
        if kind == "where":
            d = s.question.split()[-1].rstrip("?")
            assert len(boxes) == s.answer.count("row") and d.isdigit()


def _jsonl(tmp_path, rows):
    import json
    Image.new("RGB", (84, 56)).save(tmp_path / "a.png")
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"image": "a.png", "question": "q?", "answer": "1", **r}) + "\n" for r in rows))
    return f


def test_jsonl_box_and_boxes(tmp_path):
    from ral_core.data.jsonl import JsonlDataset
    ds = JsonlDataset(_jsonl(tmp_path, [{"box": [0, 0, 28, 28]}, {"boxes": [[28, 0, 56, 28], [0, 28, 28, 56]]}, {}]))
    assert [ds.sample(i)["boxes"] for i in range(3)] == [[(0, 0, 28, 28)], [(28, 0, 56, 28), (0, 28, 28, 56)], []]


@pytest.mark.parametrize("row, msg", [
    ({"box": [0, 0, 100, 28]}, "outside the 84×56 image"),
    ({"box": [10, 0, 10, 28]}, "is empty"),
    ({"boxes": [[0, 0, 28]]}, "must be 4 numbers"),
    ({"box": [0, 0, 1, 1], "boxes": [[0, 0, 1, 1]]}, "either box or boxes"),
])
def test_jsonl_bad_box_is_refused_up_front_with_its_line(tmp_path, row, msg):
    from ral_core.data.jsonl import JsonlDataset
    with pytest.raises(RALError) as e:
        JsonlDataset(_jsonl(tmp_path, [{}, row]))
    assert str(e.value).startswith("d.jsonl line 2: ") and msg in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path) not in str(e.value)


def test_auto_divergence_is_kl_for_one_box_and_mass_for_several():
    """`ground_div=auto`: a row of a one-box sample is pulled toward the box target (KL), a row of a several-box
    sample only toward the boxes' union (−log on-target share), since it may read one region at a time."""
    from types import SimpleNamespace

    from ral_core.grounding import LOSSES_BY_DIV
    from ral_core.losses import LossContext
    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(torch.randn((2, 1, 3, 6), generator=g), -1)
    visual = torch.tensor([[0, 1, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    cover = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0.]])
    target = torch.tensor([[0, 0.9, 0.05, 0.05, 0, 0], [0, 0.45, 0.45, 0.05, 0.05, 0]])
    batch = SimpleNamespace(visual_keys=visual, target_keys=cover,
                            ground={"target": target, "weight": torch.ones(2), "regions": torch.tensor([1, 3])})
    mask = torch.ones(2, 3, dtype=torch.bool)

    def value(div, rows):
        ctx = LossContext(mask=mask[rows], logp=torch.zeros(len(rows), 3), attn=[attn[rows]],
                          batch=SimpleNamespace(visual_keys=visual[rows], target_keys=cover[rows],
                                                ground={k: v[rows] for k, v in batch.ground.items()}))
        return float(LOSSES_BY_DIV[div](ctx)[0])
    assert value("auto", [0]) == pytest.approx(value("kl", [0]))
    assert value("auto", [1]) == pytest.approx(value("mass", [1]))
    assert value("kl", [1]) != pytest.approx(value("mass", [1]))
