"""Training configuration: one dataclass, YAML recipes, `key=value` overrides, validation with messages
that say what to fix (including the zero-gradient trap of the attention term)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ral_core.errors import RALError

RECIPES = Path(__file__).resolve().parents[1] / "assets" / "recipes"
PRECISIONS = ("auto", "fp32", "bf16-mixed")


@dataclass
class TrainConfig:
    # model and output
    model: str = "default"
    output_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    threads: int = 1                     # torch threads per process on CPU
    precision: str = "auto"              # auto | fp32 | bf16-mixed (Trainer: fp32 master weights for half checkpoints)
    dist: str = "auto"                   # several processes: ddp | fsdp (torch FSDP2, sharded) | auto (fsdp under an
                                         # accelerate FSDP config, else ddp); see ral_core/distributed.py
    # data: 'grounding' (bundled digit grids) or a JSONL file (image, question, answer[, boxes])
    dataset: str = "grounding"
    task_kinds: list = field(default_factory=lambda: ["cell", "row", "where"])
    grid_rows: int = 3
    grid_cols: int = 3
    data_seed: int = 0
    # rollouts
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0
    advantage_scale: str = "std"         # std | none
    reward_weights: dict = field(default_factory=lambda: {"exact_match": 1.0})
    # optimisation
    steps: int = 50
    epochs: int = 2                      # passes over each rollout batch
    minibatch_size: int = 32             # sequences per backward pass
    grad_accum: int = 1                  # backward passes per optimizer update
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"           # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_norm: str = "token"             # token | bnpo | sequence | dr_grpo = TRL's dapo | bnpo | grpo | dr_grpo
    beta: float = 0.0                    # k3 KL to the frozen reference
    # attention terms
    lambda_attn: float = 0.0             # RAL: A · JSD(p_θ ‖ sg(p_old))
    gamma_opad: float = 0.0              # OPAD: JSD(p_student ‖ p_teacher)
    lambda_token_kl: float = 0.0         # token-level reverse KL to the teacher
    teacher: str = ""
    lambda_ground: float = 0.0           # attention target: w_i · D(q_box ‖ p_visual), from update 1 (grounding.py)
    ground_on: str = "rewarded"          # rollouts the target term acts on: rewarded | advantage (A-weighted)
    ground_div: str = "kl"               # target term: kl (KL(q ‖ p)) | jsd | mass (−log on-target share) | auto
                                         # (kl for one box, mass for several)
    ground_layers: typing.Any = "policy"  # layers the grounded terms read: policy (= attn_layers) | last | all |
                                          # levers (top explore_top_k of the causal-lever map) | int | list of ints
    ground_heads: typing.Any = "mean"     # mean (all heads) | a head index or a list: the mean of those is targeted
    attn_layers: typing.Any = "last"     # last | all | int | list of ints
    attn_row: str = "own"                # own (paper) | predicts
    attn_support: str = "all"            # all | visual
    attn_per_head: bool = False
    # attention exploration (docs/method.md, 'Attention exploration': the remedy for the silent decisive row)
    explore: bool = False                # perturb attention during rollouts and learn from it
    explore_sigma: float = 1.0           # std of the per-rollout attention-logit bias (0: inert)
    explore_weight: float = 1.0          # weight of the exploration term (0 = noise-only control)
    explore_layers: typing.Any = "levers"  # levers (top of the causal-lever map) | last | all | int | list
    explore_top_k: int = 2
    explore_lever_strength: float = 3.0  # steering strength of the lever map that picks the 'levers' layers
    explore_per_head: bool = False
    explore_keys: str = "visual"         # visual | all
    explore_row: str = "predicts"        # predicts (includes the first-token decision row) | own
    explore_schedule: str = "constant"   # constant | linear (σ decays to 0 by the last step)
    # what is trained
    lora_r: int = 0                      # 0 = full fine-tuning of the language model
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    freeze_vision: bool = True           # vision tower and projector
    train_layers: typing.Any = "all"     # what full fine-tuning trains of the language model: all | layers (the
                                         # decoder layers; embeddings and final norm frozen) | last | a decoder-layer
                                         # index (−1: the last) or a list: only those layers
    train_modules: str = "all"           # of those layers: all | attention (the attention block) | qk (the query and
                                         # key projections: where the layer looks, not what it reads)
    # speed (vision_cache.py, prefix_share.py): exact reuse of work the G rollouts of a step share
    vision_cache: bool = True            # each distinct image encoded once per step (only while the vision is frozen)
    share_prompt: str = "auto"           # each group's prompt prefilled once and computed once per pass: auto (when
                                         # the prompt is at least as long as max_new_tokens) | true | false
    # bookkeeping
    save_every: int = 0                  # 0: only at the end (and on cancel)
    keep_checkpoints: int = 2
    snapshot_every: int = 0              # attention snapshots of probe samples
    probe_samples: int = 2
    eval_every: int = 0
    eval_samples: int = 64
    log_tensorboard: bool = False
    log_attention: bool = True           # capture the policy rows for metrics even when no term uses them
    attn_metrics_every: int = 5          # every k steps, one extra forward measures JSD(new ‖ old attention)

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def updates_per_step(self) -> int:
        micro = -(-self.rollouts_per_step // self.minibatch_size)
        return self.epochs * -(-micro // self.grad_accum)

    @property
    def uses_policy_attention(self) -> bool:
        from ral_core.rewards import ATTENTION_REWARDS
        return (self.lambda_attn > 0 or self.gamma_opad > 0 or self.lambda_ground > 0
                or any(k in ATTENTION_REWARDS for k in self.reward_weights))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise RALError(msg)
        _check_bounds(self)
        need(self.group_size >= 2, f"group_size must be ≥ 2 (got {self.group_size}): advantages compare rollouts "
             "of the same prompt")
        need(self.prompts_per_step >= 1, "prompts_per_step must be ≥ 1")
        need(self.steps >= 1, "steps must be ≥ 1")
        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(self.epochs >= 1 and self.minibatch_size >= 1 and self.grad_accum >= 1,
             "epochs, minibatch_size and grad_accum must be ≥ 1")
        for k in ("lambda_attn", "gamma_opad", "lambda_token_kl", "lambda_ground", "beta", "weight_decay",
                  "max_grad_norm"):
            need(getattr(self, k) >= 0, f"{k} must be ≥ 0 (got {getattr(self, k)})")
        need(self.temperature > 0, "temperature must be > 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(1 <= self.max_new_tokens <= 512, "max_new_tokens must be between 1 and 512")
        need(0 <= self.clip_low < 1 and self.clip_high >= 0, "clip_low must be in [0, 1) and clip_high ≥ 0")
        need(self.loss_norm in ("token", "bnpo", "sequence", "dr_grpo"),
             "loss_norm must be token, bnpo, sequence or dr_grpo (TRL's dapo, bnpo, grpo, dr_grpo)")
        need(self.attn_row in ("own", "predicts"), "attn_row must be 'own' (paper) or 'predicts'")
        need(self.attn_support in ("all", "visual"), "attn_support must be 'all' or 'visual'")
        need(self.schedule in ("constant", "linear", "cosine"), "schedule must be constant, linear or cosine")
        need(self.advantage_scale in ("std", "none"), "advantage_scale must be std or none")
        need(self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
        need(self.dist in ("auto", "ddp", "fsdp"), "dist must be auto, ddp or fsdp")
        need(self.precision in PRECISIONS,
             f"precision must be auto, fp32 or bf16-mixed (got {self.precision!r}): auto trains a bf16/fp16 checkpoint "
             "with fp32 master weights (bf16 autocast on a GPU, fp32 compute on the CPU) and an fp32 one in fp32")
        need(self.explore_sigma >= 0 and self.explore_weight >= 0, "explore_sigma and explore_weight must be ≥ 0")
        need(self.explore_keys in ("visual", "all"), "explore_keys must be visual or all")
        need(self.explore_row in ("own", "predicts"), "explore_row must be own or predicts")
        need(self.explore_schedule in ("constant", "linear"), "explore_schedule must be constant or linear")
        self.share_prompt = str(self.share_prompt).lower()
        need(self.share_prompt in ("auto", "true", "false"), "share_prompt must be auto, true or false")
        need(self.attn_metrics_every >= 0, "attn_metrics_every must be ≥ 0 (0 = never)")
        need(self.explore_top_k >= 1, "explore_top_k must be ≥ 1")
        need(self.explore_lever_strength > 0, "explore_lever_strength must be > 0 (a logit bias, e.g. 1 or 3)")
        need(self.lora_r >= 0, "lora_r must be ≥ 0 (0 = full fine-tuning)")
        if (self.gamma_opad > 0 or self.lambda_token_kl > 0) and not self.teacher:
            raise RALError("gamma_opad / lambda_token_kl need a teacher model: set teacher=DIR")
        need(self.ground_on in ("rewarded", "advantage"), "ground_on must be rewarded or advantage")
        need(self.ground_div in ("kl", "jsd", "mass", "auto"), "ground_div must be kl, jsd, mass or auto")
        _check_ground_selection(self)
        _check_train_layers(self)
        if self.teacher and (self.gamma_opad > 0 or self.lambda_token_kl > 0) and _same_model(self.teacher, self.model):
            raise RALError(f"the teacher is the student itself ({self.teacher!r}): OPAD would distil the model into "
                           "itself and move nothing — use teacher=teacher (the bundled task-trained teacher) or "
                           "another model directory")
        if self.lambda_attn > 0 and self.updates_per_step < 2:
            raise RALError(
                f"lambda_attn > 0 with {self.updates_per_step} optimizer update per rollout batch: the RAL attention "
                "term's gradient is exactly zero on the first update after a rollout (JSD'(p‖q) = 0 at p = q), so it "
                "would never act. Use ≥ 2 updates per batch: epochs ≥ 2, or minibatch_size < "
                f"{self.rollouts_per_step} (prompts_per_step × group_size)")
        return self


def _index_list(v, lowest: int | None = 0) -> list | None:
    """An int or a non-empty list of ints (each ≥ `lowest` unless None) → that list; anything else → None."""
    items = v if isinstance(v, (list, tuple)) else [v]
    ok = items and all(isinstance(i, int) and not isinstance(i, bool) and (lowest is None or i >= lowest)
                       for i in items)
    return list(items) if ok else None


def _check_ground_selection(cfg: "TrainConfig"):
    """ground_layers / ground_heads: their form here; layer and head ranges against the model when it is loaded
    (policy.policy_specs)."""
    gl, gh = cfg.ground_layers, cfg.ground_heads
    if not (gl in ("policy", "last", "all", "levers") or _index_list(gl, None) is not None):
        raise RALError(f"ground_layers must be policy, last, all, levers, a layer index (−1: the last) or a list "
                       f"of them (got {gl!r})")
    if not (gh == "mean" or _index_list(gh) is not None):
        raise RALError(f"ground_heads must be mean or a head index ≥ 0 or a list of them, e.g. [0, 2] (got {gh!r})")
    if gh != "mean" and len(set(_index_list(gh))) != len(_index_list(gh)):
        raise RALError(f"ground_heads lists a head twice (got {gh!r})")


def _check_train_layers(cfg: "TrainConfig"):
    """train_layers / train_modules: their form here; the layer range against the model when it is loaded
    (train_state)."""
    tl = cfg.train_layers
    items = None if tl in ("all", "layers", "last") else _index_list(tl, None)
    if tl not in ("all", "layers", "last") and items is None:
        raise RALError(f"train_layers must be all, layers, last, a decoder-layer index (−1: the last) or a list of "
                       f"them, e.g. [2, 3] (got {tl!r})")
    if items is not None and len(set(items)) != len(items):
        raise RALError(f"train_layers lists a layer twice (got {tl!r})")
    if cfg.train_modules not in ("all", "attention", "qk"):
        raise RALError(f"train_modules must be all, attention or qk (got {cfg.train_modules!r})")
    for k, v in (("train_layers", tl), ("train_modules", cfg.train_modules)):
        if v != "all" and cfg.lora_r > 0:
            raise RALError(f"{k}={v!r} selects what full fine-tuning trains; with LoRA (lora_r > 0) the adapters "
                           f"are what trains: leave {k} at all")


def _same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same model: equal names, or paths to the same folder ('default' is the
    embedded model's folder). Light on purpose: no model is loaded."""
    def where(x):
        x = str(x).strip()
        if x in ("", "default", "teacher") and not Path(x).exists():
            return str((RECIPES.parent / ("teacher_model" if x == "teacher" else "default_model")).resolve())
        p = Path(x).expanduser()
        return str(p.resolve()) if p.exists() else x
    return where(a) == where(b)


# (lowest, highest) of whole-number keys. Upper bounds keep one step (and one app request) bounded:
# `prompts_per_step=100000` once ran silently for minutes. Generous for a GPU. None: validate() words the
# lower bound itself (group_size ≥ 2 explains why).
RANGES = {"prompts_per_step": (None, 1024), "group_size": (None, 64), "steps": (None, 100_000),
          "epochs": (None, 64), "minibatch_size": (None, 4096), "grad_accum": (None, 1024), "threads": (1, 256),
          "warmup_steps": (0, 100_000), "save_every": (0, 100_000), "keep_checkpoints": (1, 1000),
          "snapshot_every": (0, 100_000), "probe_samples": (0, 64), "eval_every": (0, 100_000),
          "eval_samples": (1, 100_000), "attn_metrics_every": (None, 100_000), "explore_top_k": (None, 1024),
          "lora_r": (None, 1024), "lora_alpha": (1, 100_000), "grid_rows": (1, 9), "grid_cols": (1, 9)}
MAX_ROLLOUTS_PER_STEP = 16_384
SEED_MAX = 2**32 - 1  # numpy's seed range; larger ints overflow torch.manual_seed ("unpacking long long")


def _check_bounds(cfg: "TrainConfig"):
    """Types, finiteness and ranges of every numeric field, before any rule that compares them."""
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise RALError(f"{f.name} must be a whole number (got {v!r})")
        if kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RALError(f"{f.name} must be a number (got {v!r})")
            if not math.isfinite(v):
                raise RALError(f"{f.name} must be a finite number (got {v})")
        lo, hi = RANGES.get(f.name, (None, None))
        if hi is not None and v > hi:
            raise RALError(f"{f.name} must be ≤ {hi:,} (got {v:,})")
        if lo is not None and v < lo:
            raise RALError(f"{f.name} must be ≥ {lo:,} (got {v:,})")
    for k in ("seed", "data_seed"):
        v = getattr(cfg, k)
        if not 0 <= v <= SEED_MAX:
            shown = f"{v:.3g}" if abs(v) >= 1e12 else str(v)
            raise RALError(f"{k} must be a whole number between 0 and {SEED_MAX:,} (got {shown})")
    if cfg.rollouts_per_step > MAX_ROLLOUTS_PER_STEP:
        raise RALError(f"prompts_per_step × group_size = {cfg.rollouts_per_step:,} rollouts per step; the limit is "
                       f"{MAX_ROLLOUTS_PER_STEP:,} — lower one of them")
    if not (isinstance(cfg.reward_weights, dict) and cfg.reward_weights and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            for w in cfg.reward_weights.values())):
        raise RALError(f"reward_weights must map reward names to finite numbers (got {cfg.reward_weights!r})")
    if cfg.lr > 1:
        raise RALError(f"lr must be ≤ 1 (got {cfg.lr:g}); AdamW learning rates are around 1e-6 … 1e-3")
    if not 0 <= cfg.lora_dropout < 1:
        raise RALError(f"lora_dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if cfg.dataset == "grounding":
        from ral_core.data.grounding import TASK_KINDS
        bad = [k for k in cfg.task_kinds if k not in TASK_KINDS]
        if bad or not cfg.task_kinds:
            raise RALError(f"task_kinds {bad or '[]'} unknown; choose from {', '.join(TASK_KINDS)}")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_bool(value, name: str = "the setting") -> bool:
    """A yes/no setting from a bool, 0/1, or the words true/false, yes/no, on/off, 1/0 (any case, spaces ignored);
    anything else is refused in one line. Strings are never truth-tested: bool("false") is True."""
    if isinstance(value, bool) or (getattr(value, "dtype", None) is not None and value.dtype.kind == "b"
                                   and getattr(value, "ndim", 1) == 0):  # numpy's bool scalar too
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise RALError(f"{name} must be true or false (also yes/no, on/off, 1/0), got {shown}")


def _coerce(name: str, value, hint):
    """Check/convert a value against the dataclass annotation, with a clear message."""
    hint = str(hint)
    try:
        if hint in ("int", "<class 'int'>"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint in ("float", "<class 'float'>"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint in ("bool", "<class 'bool'>"):
            try:
                return parse_bool(value)
            except RALError:
                raise TypeError from None
        if hint in ("str", "<class 'str'>"):
            if isinstance(value, (dict, list)):
                raise TypeError
            return "" if value is None else str(value)
        if hint in ("list", "<class 'list'>"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return value
        if hint in ("dict", "<class 'dict'>"):
            if not isinstance(value, dict):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise RALError(f"config key '{name}' expects {hint.replace('<class ', '').strip('>').strip(chr(39))}, "
                       f"got {value!r}") from None
    return value


def build_config(path: str | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A recipe YAML (path or recipe name such as 'ral') plus `key=value` overrides → validated config."""
    data: dict = {}
    if path:
        p = Path(path)
        # a bare recipe name ('ral', 'grounded') is always the bundled recipe: a folder or file of that name in
        # the working directory (e.g. a run's output folder) must not stand in for it
        if p.name == str(path) and not p.suffix and (RECIPES / f"{path}.yaml").exists():
            p = RECIPES / f"{path}.yaml"
        if p.is_dir():
            raise RALError(f"config '{path}' is a folder; give a recipe YAML file or one of the recipes: "
                           f"{', '.join(sorted(x.stem for x in RECIPES.glob('*.yaml')))}")
        if not p.exists():
            raise RALError(f"config file '{path}' does not exist; recipes: {', '.join(sorted(x.stem for x in RECIPES.glob('*.yaml')))}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RALError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise RALError(f"config file '{path}' must be a mapping of key: value")
    if isinstance(overrides, dict):
        data.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise RALError(f"override '{item}' must look like key=value")
            k, v = item.split("=", 1)
            try:
                data[k.strip()] = yaml.safe_load(v) if v.strip() else ""
            except yaml.YAMLError:
                data[k.strip()] = v
    hints = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            close = difflib.get_close_matches(k, hints, n=1)
            raise RALError(f"unknown config key '{k}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        kwargs[k] = _coerce(k, v, hints[k])
    return TrainConfig(**kwargs).validate()
