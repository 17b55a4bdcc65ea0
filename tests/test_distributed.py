"""Two-process CPU data parallel (gloo) through torchrun: ranks see different prompts, stay identical."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(tmp_path, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:  # a free port: another test run on this machine may hold a fixed one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(Path(__file__).parent / "dist_worker.py"), str(tiny_model_dir), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a["world"] == b["world"] == 2
    assert a["prompts"] != b["prompts"]  # each rank samples its own prompts
    trained = [k for k in a["params"] if "language_model" in k]
    assert trained and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    from transformers import AutoModelForImageTextToText
    init = dict(AutoModelForImageTextToText.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.equal(init[k].detach(), a["params"][k]) for k in trained)  # training really happened
