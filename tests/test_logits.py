"""Logits only where used: the inspect capture pass runs the LM head on one position and gives the same
maps as a pass with full logits, in every family; rollouts / updates score only the response rows; the lever map
only the answer rows."""
import numpy as np
import pytest
import torch

from ral_core import inspection
from ral_core.builders.tiny import TINY_FAMILIES, tiny_adapter


class _HeadRows:
    """Positions the LM head was applied to, per call."""

    def __init__(self, model):
        self.calls = []
        self.h = model.get_output_embeddings().register_forward_hook(
            lambda m, i, o: self.calls.append(tuple(i[0].shape[:-1])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_inspect_maps_identical_without_logits(family, task, monkeypatch):
    a = tiny_adapter(family)
    s = task.sample(0)
    with _HeadRows(a.model) as head:
        lean = inspection.inspect(a, s.image, s.question, max_new_tokens=4)
    assert head.calls[-1] == (1, 1)  # the capture pass: one position, not [1, L]
    monkeypatch.setattr(inspection, "CAPTURE_ONLY", {})  # the pass as it was: logits for every position
    with _HeadRows(a.model) as head:
        full = inspection.inspect(a, s.image, s.question, max_new_tokens=4)
    assert head.calls[-1][1] > 30  # the reference really computed all of them
    assert lean.answer_ids == full.answer_ids
    np.testing.assert_array_equal(lean.visual, full.visual)
    np.testing.assert_array_equal(lean.mass, full.mass)


def test_inspect_many_capture_pass_has_no_logits(tiny_qwen, task):
    with _HeadRows(tiny_qwen.model) as head:
        inspection.inspect_many(tiny_qwen, [task.sample(i).image for i in range(3)],
                                [task.sample(i).question for i in range(3)], max_new_tokens=3)
    assert head.calls[-1] == (3, 1)


def test_rollout_scores_only_the_response_rows(tiny_qwen, task):
    from ral_core.losses import token_logprobs
    from ral_core.policy import PolicySpec, forward_policies
    from ral_core.rollout import rollouts_from_completions
    samples = [task.sample(i) for i in range(2)]
    samples = [{"image": s.image, "question": s.question, "answer": s.answer, "boxes": s.boxes} for s in samples]
    comp = torch.randint(10, 300, (4, 5), generator=torch.Generator().manual_seed(0))
    spec = PolicySpec([2])
    with _HeadRows(tiny_qwen.model) as head:
        ro = rollouts_from_completions(tiny_qwen, samples, 2, comp, None, spec, temperature=1.3)
        r = forward_policies(tiny_qwen.model, ro, spec, need_logits=True)
    N, T = ro.completion.shape
    assert head.calls == [(N, T), (N, T)]  # old-policy pass and the update pass: T rows each, not P + T
    with torch.no_grad():
        ref = tiny_qwen.model(**ro.inputs).logits[:, ro.P - 1:ro.P + T - 1]
    torch.testing.assert_close(r["logits"], ref / 1.3, rtol=0, atol=1e-6)
    torch.testing.assert_close(ro.old_logp, token_logprobs(ref, ro.completion, 1.3), rtol=0, atol=1e-6)


def test_lever_probe_scores_only_the_answer_rows(tiny_qwen, task):
    from ral_core.levers import _sample_effects
    s = task.sample(0)
    sample = {"image": s.image, "question": s.question, "answer": s.answer, "boxes": s.boxes}
    with _HeadRows(tiny_qwen.model) as head:
        out = _sample_effects(tiny_qwen, sample, [1, 2], 3.0, False)
    b = tiny_qwen.build_inputs([s.image], [s.question], [s.answer], add_eos=False)
    ans = torch.nonzero(b["response_mask"][0]).squeeze(-1)
    assert head.calls == [(5, len(ans))]  # 1 + 2 · 2 layers variants, answer rows only
    with torch.no_grad():
        logits = tiny_qwen.model(**b["model_inputs"]).logits[0, ans - 1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, b["model_inputs"]["input_ids"][0, ans][:, None]).sum()
    assert out["p_answer"] == pytest.approx(float(lp.exp()), rel=1e-5)
