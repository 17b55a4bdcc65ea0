"""FSDP (dist=fsdp: torch FSDP2 over 2 CPU processes, gloo) against one process on the same global batch, and exact
resume under sharding. One torchrun launch (tests/fsdp_worker.py) runs every 2-process part; the reference runs here."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp_worker


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("fsdp")
    from ral_core.builders.tiny import tiny_qwen2_vl
    bf16 = tiny_qwen2_vl(layers=3, dtype=torch.bfloat16)
    bf16.model.save_pretrained(f"{tiny_model_dir}-bf16")
    bf16.tokenizer.save_pretrained(f"{tiny_model_dir}-bf16")
    bf16.image_processor.save_pretrained(f"{tiny_model_dir}-bf16")
    shutil.copytree(tiny_model_dir, f"{tiny_model_dir}-teacher", dirs_exist_ok=True)  # a teacher is not the student
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:  # a free port: other test runs on this machine may hold a fixed one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(Path(__file__).parent / "fsdp_worker.py"), str(tiny_model_dir), str(out), "full", "lora", "bf16"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out / "fsdp.pt", weights_only=False), torch.load(out / "shards1.pt", weights_only=False), out


def _close(a: dict, b: dict, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    worst = max((float((a[k] - b[k]).abs().max()), k) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a), worst


@pytest.mark.slow
@pytest.mark.parametrize("name", list(fsdp_worker.CONFIGS))
def test_fsdp_matches_one_process_on_the_same_global_batch(fsdp_run, tiny_model_dir, tmp_path, name):
    res, shards1, _ = fsdp_run
    got = res[f"eq-{name}"]
    ref = fsdp_worker.equivalence(tiny_model_dir, tmp_path, name)
    assert got["world"] == 2 and ref["world"] == 1
    assert got["rewards"] == ref["rewards"]  # the same global rollout batch
    assert got["updates"] == ref["updates"] == 2
    # the attention terms ran under sharding: silent on the 1st update (p = p_old), acting on the 2nd. The logged terms
    # are each process's own share, so they are not compared; the gradient norms (over the whole model) are
    terms = got["terms"]
    for k in ("loss_ral_attn", "loss_opad_attn", "loss_kl", "loss_explore"):
        if k in ref["terms"]:
            assert abs(terms[k][1]) > 0, k
    assert terms["loss_ral_attn"][0] == 0
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5) and min(ref["grad_norms"]) > 0
    _close(got["params"], ref["params"])
    # really sharded: every trainable parameter and its AdamW state is a DTensor, each process holds about half
    for sh in (got["shards"], shards1[f"eq-{name}"]):
        assert sh["dtensor"]
        assert 0.4 * sh["global"] <= sh["local"] <= 0.6 * sh["global"]
        assert sh["opt_local"] == 2 * sh["local"]  # exp_avg + exp_avg_sq of the local shard only


@pytest.mark.slow
@pytest.mark.parametrize("name", [*fsdp_worker.CONFIGS, *fsdp_worker.RESUME_ONLY])
def test_fsdp_resume_is_exact(fsdp_run, tiny_model_dir, name):
    res, _, out = fsdp_run
    r = res[f"resume-{name}"]
    assert r["hist_resumed"] == r["hist_full"]  # the 3rd step's rollouts too: each process's RNG stream came back
    assert r["full"].keys() == r["resumed"].keys()
    assert all(torch.equal(r["full"][k], r["resumed"][k]) for k in r["full"])
    assert any(not torch.equal(r["full"][k], r["at2"][k]) for k in r["full"])  # the resumed step did train
    # the checkpoint is the single-process format: full tensors, loadable without any process group
    ck = Path(r["ckpt"])
    from safetensors.torch import load_file
    from ral_core.train_state import STATE_JSON, STATE_TENSORS
    import json
    tree = json.loads((ck / STATE_JSON).read_text())
    assert len(tree["rng_ranks"]) == 2
    assert any(k.startswith("rng_ranks.1.") for k in load_file(str(ck / STATE_TENSORS)))
    if name == "full":
        from transformers import AutoModelForImageTextToText
        saved = dict(AutoModelForImageTextToText.from_pretrained(ck).named_parameters())
        for k, v in r["at2"].items():
            assert torch.equal(saved[k].detach(), v), k
    elif name == "bf16":  # weights stay bf16 on disk; the trained ones' fp32 masters beside them
        from ral_core.train_state import MASTER_WEIGHTS
        masters = load_file(str(ck / MASTER_WEIGHTS))
        assert masters and all(torch.equal(v, r["at2"][k]) for k, v in masters.items())
        assert json.loads((ck / "config.json").read_text())["dtype"] == "bfloat16"
    else:
        w = load_file(str(ck / "adapter_model.safetensors"))
        lora = {k: v for k, v in r["at2"].items() if "lora_" in k}
        assert len(w) == len(lora) > 0
        for k, v in w.items():
            match = [n for n in lora if n.replace(".default", "") == k]
            assert match and torch.equal(lora[match[0]], v), k
