"""RAL inside TRL's GRPOTrainer: a script to copy.

    pip install 'ral-workbench[trl]'      # from a checkout: pip install -e '.[trl]'  (trl==1.16.0)
    python examples/trl_ral.py            # the embedded 0.9M-param Qwen2-VL on digit grids: CPU, well under a minute
    python examples/trl_ral.py --model Qwen/Qwen2-VL-2B-Instruct --steps 200 --bf16    # a hub model, on a GPU

Against a plain TRL GRPO script only three things change:
  1. GRPOConfig → RALGRPOConfig, with `lambda_attn` (and optionally attn_layers / attn_row / attn_support);
  2. GRPOTrainer → RALGRPOTrainer;
  3. ≥ 2 optimizer updates per rollout batch (here `num_iterations=2`): on the first update after a rollout the
     RAL term's gradient is exactly zero (p_θ = p_old), so a one-update configuration is refused.
Everything else is TRL's: dataset format (a conversational `prompt` column plus `image`), reward functions, the
processor as `processing_class`, vLLM rollouts (`use_vllm=True`; the attention is recomputed by the trainer's own
forward passes, never read from vLLM), logging (`ral/...` metrics next to TRL's), DeepSpeed/FSDP through accelerate.
OPAD: add `gamma_opad=1.0` to the config and `teacher_model=<model or path>` (same tokenizer and image processing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# the embedded default model needs no network: stay offline unless a --model is named (read before any HF import)
if "--model" not in " ".join(sys.argv):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from ral_core.data import GroundingTask  # noqa: E402
from ral_core.integrations.trl import RALGRPOConfig, RALGRPOTrainer, processor_for  # noqa: E402
from ral_core.rewards import exact_match  # noqa: E402


def load(model_id: str):
    """(model, processor, generation kwargs). Without --model: the embedded default model, whose processor we build
    (its stock Qwen2VLProcessor would need torchvision); a hub id or directory: transformers' Auto classes."""
    if not model_id:
        from ral_core.models import load_adapter
        from ral_core.trainer import is_vision_param
        adapter = load_adapter("default")
        for name, p in adapter.model.named_parameters():  # train the language model, keep the vision tower
            p.requires_grad_(not is_vision_param(name))
        # a model this small must not sample its structural (image/vision/pad) tokens
        return adapter.model, processor_for(adapter), {"suppress_tokens": adapter.suppress_token_ids}
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype="auto")
    return model, AutoProcessor.from_pretrained(model_id), None


def digit_grids(n: int) -> datasets.Dataset:
    """Digit-grid questions ("What digit is in row 2 column 3?") in TRL's vision format; images rendered on access."""
    task = GroundingTask(3, 3, kinds=("cell", "row", "where"), split="train", seed=0)

    def rows(batch):
        ss = [task.sample(int(i)) for i in batch["idx"]]
        return {"prompt": [[{"role": "user", "content": s.question}] for s in ss], "image": [s.image for s in ss],
                "answer": [s.answer for s in ss]}
    return datasets.Dataset.from_dict({"idx": list(range(n))}).with_transform(rows)


def answer_reward(prompts, completions, answer, **kwargs):
    """1 for the exact answer (ral_core.rewards.exact_match), else 0."""
    return [exact_match(c[0]["content"], {"answer": a}) for c, a in zip(completions, answer)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="hub id or directory (default: the embedded 0.9M-param Qwen2-VL)")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps (num_iterations=2: one rollout per 2)")
    ap.add_argument("--lambda-attn", type=float, default=1.0)
    ap.add_argument("--attn-layers", default="last", help="'last', 'all' or comma-separated indices")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (num_generations)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    ap.add_argument("--out", default="runs/trl_ral")
    a = ap.parse_args()

    model, processor, gen_kwargs = load(a.model)
    on_cpu = not torch.cuda.is_available()
    args = RALGRPOConfig(
        output_dir=a.out, seed=0, max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=a.prompts * a.group, num_generations=a.group, max_completion_length=12,
        num_iterations=2,  # ≥ 2 updates per rollout batch, or the RAL term never acts
        lambda_attn=a.lambda_attn, attn_layers=a.attn_layers,
        beta=0.0, temperature=1.0, generation_kwargs=gen_kwargs,
        bf16=a.bf16, use_cpu=on_cpu, activation_checkpointing=not on_cpu,  # pays off on a GPU, not on this CPU
        logging_steps=4, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    trainer = RALGRPOTrainer(model=model, reward_funcs=answer_reward, args=args, train_dataset=digit_grids(10_000),
                             processing_class=processor)
    trainer.remove_callback(PrinterCallback)  # TRL's full log dicts; a summary of them is printed below
    t0 = time.perf_counter()
    trainer.train()
    if not trainer.accelerator.is_main_process:  # under accelerate launch every process gets here
        return
    logs = [h for h in trainer.state.log_history if "reward" in h]
    print(f"\n{a.steps} steps in {time.perf_counter() - t0:.0f} s; per logging window (TRL's logs, ral/ = ours):")
    for h in logs:
        print(f"  step {h['step']:3d}  reward {h['reward']:.3f}  ral/loss_ral_attn {h['ral/loss_ral_attn']:+.2e}  "
              f"ral/attn_jsd_old {h['ral/attn_jsd_old']:.2e}  ral/attn_visual_mass {h['ral/attn_visual_mass']:.3f}  "
              f"ral/ral_rows_acting {h['ral/ral_rows_acting']:.2f}")


if __name__ == "__main__":
    main()
