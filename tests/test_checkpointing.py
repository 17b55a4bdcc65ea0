"""Gradient checkpointing with capture: the captured rows, the loss and every gradient equal those of
the same pass without checkpointing — also with a steering/exploration bias, which must be re-applied when the
layer is recomputed in backward."""
import pytest
import torch

from ral_core.attention import capture, enable_gradient_checkpointing


def _pass(adapter, mi, rows, bias, checkpointing):
    m = adapter.model
    m.train()
    if checkpointing == "ours":
        enable_gradient_checkpointing(m)
    elif checkpointing == "transformers":  # switched on the usual way (non-reentrant is transformers' default)
        m.gradient_checkpointing_enable()
    else:
        m.gradient_checkpointing_disable()
    m.zero_grad()
    with capture(m, layers=[0, 2], rows=rows, bias=bias) as maps:
        out = m(**mi)
    w = torch.linspace(0, 1, maps[2].shape[-1])
    loss = out.logits.float().logsumexp(-1).mean() + (maps[2] * w).sum() + maps[0].pow(2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.gradient_checkpointing_disable()
    return loss.detach(), {k: v.detach() for k, v in maps.items()}, grads


@pytest.mark.parametrize("how", ["ours", "transformers"])
@pytest.mark.parametrize("biased", [False, True])
def test_checkpointing_keeps_rows_loss_and_gradients(tiny_qwen, task, biased, how):
    s = [task.sample(i) for i in range(2)]
    b = tiny_qwen.build_inputs([x.image for x in s], [x.question for x in s], [x.answer for x in s])
    mi = b["model_inputs"]
    L = mi["input_ids"].shape[1]
    rows = torch.arange(L - 3, L)[None].expand(2, 3)
    H = tiny_qwen.num_heads
    bias = {1: torch.randn(2, H, 1, L, generator=torch.Generator().manual_seed(0)) * 2} if biased else None
    l0, m0, g0 = _pass(tiny_qwen, mi, rows, bias, False)
    l1, m1, g1 = _pass(tiny_qwen, mi, rows, bias, how)
    assert torch.allclose(l0, l1, atol=1e-6, rtol=1e-6)
    assert set(m0) == set(m1) == {0, 2} and all(torch.allclose(m0[k], m1[k], atol=1e-7) for k in m0)
    assert set(g0) == set(g1) and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), (n, float((g0[n] - g1[n]).abs().max()))


def test_reentrant_checkpointing_is_refused_while_training(tiny_qwen, task):
    from ral_core.errors import RALError

    s = task.sample(0)
    mi = tiny_qwen.build_inputs([s.image], [s.question])["model_inputs"]
    m = tiny_qwen.model
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        with pytest.raises(RALError, match="non-reentrant"):
            with capture(m, layers="last"):
                m(**mi)
        with torch.no_grad(), capture(m, layers="last") as maps:  # no gradients: nothing to lose
            m(**mi)
        assert maps
    finally:
        m.gradient_checkpointing_disable()
