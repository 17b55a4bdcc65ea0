"""RAL and OPAD inside TRL's GRPOTrainer (written against trl 1.16.0: `pip install 'ral-workbench[trl]'`).

    from ral_core.integrations.trl import RALGRPOConfig, RALGRPOTrainer
    args = RALGRPOConfig(output_dir="out", lambda_attn=1.0, num_iterations=2, ...)   # every GRPOConfig field too
    trainer = RALGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=proc)
    trainer.train()

TRL's loss code is not copied or changed. Three overrides hook our capture (`ral_core.attention.capture`) into
forwards TRL already makes, and our loss functions (`ral_core.losses`) add the terms:

- `_generate_and_score_completions`: TRL's old-policy pass — the no-grad forward of the rollout policy that yields
  `old_per_token_logps` — runs under capture. Its attention policy is stored beside the old log-probs as
  `inputs["ral_old_attn"]` [N, layers, H|1, T, K], so TRL shuffles and splits it with them. With OPAD the frozen
  teacher scores the same sequences in one more teacher-forced pass (`ral_teacher_attn`).
- `_get_per_token_logps_and_entropies`: on request only, the model TRL calls is wrapped so that each of its forwards
  (one per chunk) runs under capture of the policy rows; every other forward (reference model, generation) is TRL's.
- `_compute_loss`: TRL's training forward runs under capture, TRL computes its loss, and we add
  λ · A · JSD(p_θ ‖ sg(p_old)) + γ · JSD(p_θ ‖ p_teacher), averaged over the completion tokens with the normaliser
  of TRL's `loss_type` (`window_weight`: the same share of the accumulation window as TRL's own policy term).

The attention is always recomputed by the trainer's forward passes, never read from the sampler, so this works with
TRL's vLLM rollouts in principle: vLLM samples, and TRL then scores the samples with the training model (with vLLM,
TRL always runs the old-policy pass for its importance-sampling correction), which is where p_old is captured. Not
tested here (no GPU, no vLLM). Attention exploration is not offered: it perturbs the attention *while sampling*,
which happens inside `generate()` or vLLM.

The zero-gradient trap (docs/method.md): at θ = θ_old the RAL term's gradient is exactly 0, so the term needs ≥ 2
optimizer updates per rollout batch: `num_iterations ≥ 2` or `steps_per_generation > gradient_accumulation_steps`.
Those are also exactly the settings in which TRL runs its old-policy pass; a configuration without one is refused.

Metrics go through TRL's logging (`self._metrics`, averaged per logging step, mean over processes) as `ral/<name>`
with the names of our trainer's metrics.jsonl: `ral/loss_ral_attn`, `ral/attn_jsd_old`, `ral/loss_opad_attn`,
`ral/attn_jsd_teacher`, and per rollout batch the rollout policy's `ral/attn_entropy`, `ral/attn_visual_mass` and
where the RAL term can act (`ral/ral_rows_acting`, `_cancelled`, `_zero_var`, `ral/ral_effective_weight`,
`ral/rows_prefix_shared`; see rollout.silence_stats).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head

from ral_core.attention import capture, decoder_attention_modules, resolve_layers, unwrap
from ral_core.errors import RALError
from ral_core.models.base import control_ids, user_text_ids
from ral_core.losses import LOSSES, LossContext, Window, combined_loss, window_weight
from ral_core.policy import PolicySpec, Rollouts, attention_policy, key_validity, matched_layers, prefix_classes
from ral_core.rollout import attention_stats

TRL_PIN = "1.16.0"

# TRL loss_type → our normalisation of a per-token term (ral_core.losses docstring). cispo and vespo divide by
# dapo's normaliser, sapo by grpo's: the attention term only needs the normaliser, not TRL's policy-term variant.
NORM_OF_LOSS_TYPE = {"dapo": "token", "cispo": "token", "vespo": "token", "bnpo": "bnpo", "grpo": "sequence",
                     "sapo": "sequence", "dr_grpo": "dr_grpo"}

# The explanation our trainer gives (ral_core/config.py, TrainConfig.validate); tests keep the two identical.
ZERO_GRADIENT = ("the RAL attention term's gradient is exactly zero on the first update after a rollout "
                 "(JSD'(p‖q) = 0 at p = q), so it would never act")

# keys of the per-rollout-batch statistics: fixed, so every process gathers the same vector
ROLLOUT_KEYS = ("attn_entropy", "attn_visual_mass", "ral_rows_zero_var", "ral_rows_cancelled", "ral_rows_acting",
                "ral_effective_weight", "rows_prefix_shared")
# model inputs TRL's _compute_loss passes to _get_per_token_logps_and_entropies (the teacher pass passes the same)
_MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class RALGRPOConfig(GRPOConfig):
    """GRPOConfig plus the attention terms. Every GRPOConfig field keeps TRL's meaning and default."""

    lambda_attn: float = field(default=0.0, metadata={
        "help": "RAL: weight of mean_t A·JSD(p_θ ‖ sg(p_old)). Needs ≥ 2 optimizer updates per rollout batch "
                "(num_iterations ≥ 2 or steps_per_generation > gradient_accumulation_steps)."})
    gamma_opad: float = field(default=0.0, metadata={
        "help": "OPAD: weight of mean_t JSD(p_θ ‖ p_teacher); needs teacher_model (same tokenizer and image "
                "processing as the student)."})
    attn_layers: str = field(default="last", metadata={
        "help": "Decoder layers of the attention policy: 'last', 'all', or comma-separated indices (-1 = last)."})
    attn_row: str = field(default="own", metadata={
        "help": "'own': the query at the generated token (paper, self entry removed); 'predicts': the query that "
                "predicts it."})
    attn_support: str = field(default="all", metadata={"help": "'all' earlier positions or 'visual' tokens only."})
    attn_per_head: bool = field(default=False, metadata={"help": "One policy per head instead of the head mean."})
    log_attention: bool = field(default=True, metadata={
        "help": "Capture the policy rows for the ral/ metrics even when both terms are 0 (the update is then TRL's, "
                "bit for bit)."})

    @property
    def uses_policy_attention(self) -> bool:
        return self.lambda_attn > 0 or self.gamma_opad > 0


def layer_spec(value):
    """'last' | 'all' | '0,-1' | int | list → what ral_core.attention.resolve_layers takes."""
    if isinstance(value, str) and value.strip() not in ("last", "all"):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise RALError(f"attn_layers must be 'last', 'all' or comma-separated layer indices (got {value!r})") \
                from None
    return value.strip() if isinstance(value, str) else value


def updates_per_rollout_batch(args) -> Fraction:
    """Optimizer updates per rollout batch: TRL generates every steps_per_generation · num_iterations micro-steps
    and steps the optimizer every gradient_accumulation_steps."""
    return Fraction(args.steps_per_generation * args.num_iterations, args.gradient_accumulation_steps)


def check_config(args: RALGRPOConfig, has_teacher: bool) -> None:
    """Refuse settings under which a term is silent or undefined, with what to change (RALError)."""
    for k in ("lambda_attn", "gamma_opad"):
        v = getattr(args, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise RALError(f"{k} must be a finite number ≥ 0 (got {v!r})")
    if args.attn_row not in ("own", "predicts"):
        raise RALError(f"attn_row must be 'own' (paper) or 'predicts' (got {args.attn_row!r})")
    if args.attn_support not in ("all", "visual"):
        raise RALError(f"attn_support must be 'all' or 'visual' (got {args.attn_support!r})")
    layer_spec(args.attn_layers)
    if args.gamma_opad > 0 and not has_teacher:
        raise RALError("gamma_opad > 0 needs a teacher: pass teacher_model= (a model or a path) to RALGRPOTrainer")
    generate_every = args.steps_per_generation * args.num_iterations
    if args.lambda_attn > 0 and args.gradient_accumulation_steps % generate_every == 0:
        # TRL's own test for "old == current" (it then skips the old-policy pass): nothing after an update reuses
        # the batch, so every step sees p_θ = p_old
        raise RALError(
            f"lambda_attn > 0 with {updates_per_rollout_batch(args)} optimizer update per rollout batch "
            f"(num_iterations={args.num_iterations}, steps_per_generation={args.steps_per_generation}, "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}): {ZERO_GRADIENT}. Use ≥ 2 updates per "
            "batch: num_iterations ≥ 2, or steps_per_generation > gradient_accumulation_steps")
    if args.uses_policy_attention and args.loss_type not in NORM_OF_LOSS_TYPE:
        raise RALError(f"loss_type={args.loss_type!r} has no per-token normaliser the attention terms can share; "
                       f"use one of {', '.join(NORM_OF_LOSS_TYPE)}")
    if args.uses_policy_attention and args.activation_checkpointing and \
            (args.activation_checkpointing_kwargs or {}).get("use_reentrant"):
        # reentrant checkpointing runs the first forward without autograd: the captured rows would carry no gradient
        raise RALError("the attention terms need non-reentrant activation checkpointing (the default) or none: unset "
                       "activation_checkpointing_kwargs['use_reentrant'] or set activation_checkpointing=False")


def _image_token_id(model) -> int:
    cfg = unwrap(model).config
    tid = getattr(cfg, "image_token_id", None)
    return int(tid if tid is not None else cfg.image_token_index)


def _softmax_layers(model) -> tuple[int, list[int]]:
    mods = decoder_attention_modules(model)
    return len(mods), [i for i, m in enumerate(mods) if m is not None]


def _select_rows(m: torch.Tensor, row: str) -> torch.Tensor:
    """Captured rows P−1 … P+T−1 → the policy row of each completion token (as rollout.forward_policies)."""
    return m[:, :, 1:] if row == "own" else m[:, :, :-1]


class _Capturing:
    """Stands in for the model in one TRL scoring call: each forward TRL makes through it (one per chunk) runs under
    capture of the policy rows P−1 … P+T−1, and keeps that chunk's attention policy per layer."""

    def __init__(self, model, spec: PolicySpec, logits_to_keep: int, image_token_id: int):
        self.model, self.spec, self.T, self.image_token_id = model, spec, logits_to_keep, image_token_id
        self.chunks: list[list[torch.Tensor]] = []

    def __getattr__(self, name):  # anything else TRL reads comes from the model
        return getattr(self.model, name)

    def __call__(self, **inputs):
        ids, am = inputs["input_ids"], inputs["attention_mask"]
        N, L = ids.shape
        P, T = L - self.T, self.T
        rows = torch.arange(P - 1, L, device=ids.device)[None].expand(N, T + 1)
        with capture(self.model, layers=self.spec.layers, rows=rows) as maps:  # replays under checkpointing
            out = self.model(**inputs)
        valid = key_validity({"input_ids": ids, "attention_mask": am}, ids == self.image_token_id, P, T,
                             self.spec.support)
        self.chunks.append([attention_policy(_select_rows(maps[i], self.spec.row), valid, self.spec.per_head)
                            for i in self.spec.layers])
        return out

    def policies(self) -> list[torch.Tensor]:
        """Per layer [N, H|1, T, K] over all chunks."""
        return [torch.cat([c[j] for c in self.chunks]) for j in range(len(self.spec.layers))]


class RALGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the RAL and OPAD attention terms added to its loss (module docstring).

    `args` must be a RALGRPOConfig. `teacher_model` (OPAD): a model or a path, frozen, with the student's tokenizer
    and image processing; its layers are matched to the student's at the same relative depth."""

    def __init__(self, model, reward_funcs, args: RALGRPOConfig, *, teacher_model=None, **kwargs):
        if not isinstance(args, RALGRPOConfig):
            raise TypeError("RALGRPOTrainer needs args=RALGRPOConfig(...) (a GRPOConfig with the attention terms)")
        check_config(args, teacher_model is not None)  # before TRL loads anything
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._ral_want = self._ral_caught = None
        self._ral_control = None
        self._ral_spec = self._ral_teacher_spec = self._ral_teacher = None
        if not (args.uses_policy_attention or args.log_attention):
            return  # plain TRL
        n_layers, softmax = _softmax_layers(self.model)
        self._ral_spec = PolicySpec(resolve_layers(layer_spec(args.attn_layers), n_layers, softmax), args.attn_row,
                                    args.attn_support, args.attn_per_head)
        self._ral_image_token = _image_token_id(self.model)
        if teacher_model is not None and args.gamma_opad > 0:
            self._ral_teacher = self._prepare_teacher(teacher_model, softmax)

    def _prepare_teacher(self, teacher, student_layers):
        """Frozen, with TRL's fused LM head and device placement (as TRL prepares its reference model)."""
        if isinstance(teacher, str):
            from transformers import AutoModelForImageTextToText
            teacher = AutoModelForImageTextToText.from_pretrained(teacher, dtype=unwrap(self.model).dtype)
        teacher.eval().requires_grad_(False)
        if _image_token_id(teacher) != self._ral_image_token:
            raise RALError("the teacher must share the student's tokenizer and image processing for OPAD (its image "
                           f"token id is {_image_token_id(teacher)}, the student's {self._ral_image_token})")
        heads = [unwrap(m).config.get_text_config().num_attention_heads for m in (self.model, teacher)]
        if self._ral_spec.per_head and heads[0] != heads[1]:
            raise RALError(f"attn_per_head needs a teacher with the student's {heads[0]} heads (it has {heads[1]}); "
                           "set attn_per_head=False")
        self._ral_teacher_spec = dataclasses.replace(self._ral_spec, layers=matched_layers(
            self._ral_spec.layers, student_layers, _softmax_layers(teacher)[1]))
        add_fused_lm_head(teacher, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        want = self._ral_want
        if want is None or (want == "old" and model is not self.model):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        self._ral_want = None  # one pass per request: later calls (the reference model's) stay TRL's own
        spec = self._ral_teacher_spec if want == "teacher" else self._ral_spec
        cap = _Capturing(model, spec, logits_to_keep, self._ral_image_token)
        out = super()._get_per_token_logps_and_entropies(cap, input_ids, attention_mask, logits_to_keep,
                                                         *args, **kwargs)
        self._ral_caught = cap.policies()
        return out

    def _old_pass_runs(self) -> bool:
        """TRL 1.16's condition for computing old_per_token_logps (_generate_and_score_completions)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction)

    def _check_prompts(self, inputs) -> None:
        """Conversational prompts' message text is user text: refused in one line where it spells a control token
        (a forged `<|im_end|>` would read as a new turn). A plain-string prompt is left alone: it is the caller's
        already-templated text, markers included on purpose."""
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        if self._ral_control is None:
            self._ral_control = control_ids(tok)
        for x in inputs:
            prompt = x.get("prompt") if isinstance(x, dict) else None
            if not isinstance(prompt, list):
                continue
            for i, msg in enumerate(prompt):
                content = msg.get("content") if isinstance(msg, dict) else None
                parts = [content] if isinstance(content, str) else [
                    p.get("text") for p in (content or []) if isinstance(p, dict) and p.get("type") == "text"]
                for text in parts:
                    if text is not None:
                        user_text_ids(tok, text, what=f"prompt message {i + 1} ({msg.get('role', '?')})",
                                      control=self._ral_control)

    def _generate_and_score_completions(self, inputs):
        self._check_prompts(inputs)
        active = self._ral_spec is not None and self.model.training
        old_pass = active and self._old_pass_runs()
        self._ral_want, self._ral_caught = ("old" if old_pass else None), None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._ral_want = None
        if not active:
            return out
        old, self._ral_caught = self._ral_caught, None
        if old_pass and old is None:
            raise RuntimeError(f"TRL did not run its old-policy pass where trl {TRL_PIN} does; this plug-in was "
                               f"written for trl=={TRL_PIN}")
        n = out["completion_ids"].shape[0]
        first = self.accelerator.process_index * n  # TRL hands each process a contiguous slice of whole groups' rows
        out["ral_group"] = torch.arange(first, first + n, device=out["completion_ids"].device) // self.num_generations
        if old is not None:
            out["ral_old_attn"] = torch.stack(old, 1)
            self._ral_log(self._rollout_stats(out, old), keys=ROLLOUT_KEYS)
        if self._ral_teacher is not None:
            out["ral_teacher_attn"] = torch.stack(self._teacher_attention(out), 1)
        return out

    @torch.no_grad()
    def _teacher_attention(self, out) -> list[torch.Tensor]:
        """One teacher-forced pass of the teacher over the rollout batch, through TRL's scoring function."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        self._ral_want, self._ral_caught = "teacher", None
        try:
            self._get_per_token_logps_and_entropies(
                self._ral_teacher, ids, mask, out["completion_ids"].shape[1],
                batch_size=self.args.per_device_train_batch_size, **{k: out.get(k) for k in _MM_KEYS})
        finally:
            self._ral_want = None
        caught, self._ral_caught = self._ral_caught, None
        return caught

    def _compute_loss(self, model, inputs):
        if self._ral_spec is None or not self.model.training:
            return super()._compute_loss(model, inputs)
        self._ral_want, self._ral_caught = "train", None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._ral_want = None
        attn, self._ral_caught = self._ral_caught, None
        term, metrics = self.attention_loss(inputs, attn)
        self._ral_log(metrics)
        return loss if term is None else loss + term

    # ---- the terms ------------------------------------------------------------------------------------------
    @staticmethod
    def _loss_mask(inputs) -> torch.Tensor:
        m = inputs["completion_mask"]
        return m * inputs["tool_mask"] if "tool_mask" in inputs else m

    def attention_loss(self, inputs, attn: list[torch.Tensor]) -> tuple[torch.Tensor | None, dict]:
        """λ·RAL + γ·OPAD on one micro-batch (ral_core.losses), scaled to its share of the accumulation window as
        TRL scales its policy term; None when both weights are 0 (then only metrics)."""
        args = self.args
        mask = self._loss_mask(inputs)
        old = list(inputs["ral_old_attn"].unbind(1)) if "ral_old_attn" in inputs else []
        teacher = list(inputs["ral_teacher_attn"].unbind(1)) if "ral_teacher_attn" in inputs else []
        norm = NORM_OF_LOSS_TYPE.get(self.loss_type, "token")
        ctx = LossContext(mask=mask, advantages=inputs["advantages"], attn=attn, attn_old=old, attn_teacher=teacher,
                          norm=norm, max_len=self.max_completion_length)
        weights = {"ral_attn": args.lambda_attn if old else 0.0, "opad_attn": args.gamma_opad if teacher else 0.0}
        value, metrics = combined_loss(ctx, weights)
        if old and not weights["ral_attn"]:  # how far the policy moved since the rollout, with the term off
            with torch.no_grad():
                metrics.update(LOSSES["ral_attn"](dataclasses.replace(ctx, attn=[a.detach() for a in attn]))[1])
        if not old:  # no old-policy pass (one update per batch): the current attention is the rollout policy's;
            # no silence shares from a micro-batch, which may hold parts of prefix classes
            ro = self._rollouts_view(inputs, inputs["ral_group"], mask, classes=False)
            metrics.update(attention_stats([a.detach() for a in attn], ro))
        if not any(weights.values()):
            return None, metrics
        ga = self.current_gradient_accumulation_steps
        window = Window(micro=ga, share=ga / args.steps_per_generation,
                        batch_tokens=float(inputs["num_items_in_batch"]) / self.accelerator.num_processes)
        return value * window_weight(norm, mask, window), metrics

    def _rollouts_view(self, inputs, group, mask, classes: bool = True) -> Rollouts:
        """What attention_stats reads, from TRL's batch dict (`classes`: with the prefix classes of silence_stats)."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        ro = Rollouts(inputs={}, P=inputs["prompt_ids"].shape[1], completion=inputs["completion_ids"],
                      mask=mask.bool(), texts=[], group=group, samples=[])
        ro.visual_keys = ids == self._ral_image_token
        ro.advantages = inputs["advantages"]
        if classes:
            ro.row_class = prefix_classes(ro.completion, ro.mask, group, self._ral_spec.row)
        return ro

    def _rollout_stats(self, out, old) -> dict:
        return attention_stats(old, self._rollouts_view(out, out["ral_group"], self._loss_mask(out)))

    def _ral_log(self, metrics: dict, keys=None) -> None:
        """Into TRL's metrics as ral/<name>, the mean over processes (every process logs the same keys)."""
        keys = tuple(keys) if keys is not None else tuple(sorted(metrics))
        if not keys:
            return
        v = torch.tensor([[float(metrics.get(k, math.nan)) for k in keys]], device=self.accelerator.device)
        v = self.accelerator.gather(v).nanmean(0).tolist()
        mode = "train" if self.model.training else "eval"
        for k, x in zip(keys, v):
            if not math.isnan(x):
                self._metrics[mode][f"ral/{k}"].append(x)


# ---- a processor for our own small Qwen2-VL models ------------------------------------------------------------
# renders a conversation exactly as Qwen2VLAdapter.prompt_ids does; the processor expands <|image_pad|>
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def processor_for(adapter):
    """A Qwen2VLProcessor for one of our Qwen2-VL adapters (the embedded default model, ral_core.builders.tiny) that
    TRL can use as `processing_class`. The stock class also wants a video processor, which needs torchvision; images
    need only the tokenizer and the image processor. Hub models bring their own processor (AutoProcessor)."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                                     chat_template=QWEN_CHAT_TEMPLATE)
