"""How a run holds and keeps its state: precision of the weights, seeds and the LR schedule, and checkpoints
(weights loadable as a model + the trainer state).

The trainer state (optimizer, LR scheduler, RNG streams) is safetensors + JSON, never pickle: a checkpoint
folder written by someone else can be resumed without running their code.

Layout in a checkpoint folder: `trainer_state.safetensors` holds every tensor and numpy array;
`trainer_state.json` holds the rest as a JSON tree in which tensors, arrays, tuples and dicts with
non-string keys are tagged objects (`{"__tensor__": key}` …). Decoding knows only those tags, so a hostile
file can at worst fail to load."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from ral_core.errors import RALError
from ral_core.models import load_adapter
from ral_core.vision_cache import is_vision_param

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_PICKLE = "trainer_state.pt"
FORMAT = "ral-trainer-state"
VERSION = 1
MASTER_WEIGHTS = "master_weights.safetensors"  # fp32 trainable weights of a checkpoint saved in bf16/fp16
# Set by ral_core.distributed.full_state around a multi-process save: every process's RNG streams in rank order, so
# that each process of a resumed run continues its own stream (one stream for all would resume only rank 0 exactly).
RANK_RNG: contextvars.ContextVar[list | None] = contextvars.ContextVar("ral_rank_rng", default=None)


# ---- precision ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Precision:
    """How the trainer holds and computes: trainable parameters (the master weights the optimizer updates, and so
    its state) are always fp32; `frozen` is the dtype of frozen weights (the checkpoint's under bf16-mixed, so they
    are saved unchanged), `compute` the autocast dtype (None: plain fp32 compute), `storage` the checkpoint's dtype,
    which saved weights keep."""

    mode: str                       # fp32 | bf16-mixed
    storage: torch.dtype
    frozen: torch.dtype
    compute: torch.dtype | None
    device_type: str

    def autocast(self):
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)


def resolve_precision(setting: str, storage: torch.dtype, device) -> Precision:
    """`precision` of the config → a Precision. 'auto' follows the checkpoint: an fp32 one trains in fp32; a bf16/fp16
    one gets fp32 master weights, with bf16 autocast on a CUDA GPU (frozen weights keep the checkpoint's dtype: half
    the memory) and fp32 compute on the CPU, where bf16 matmuls are slower than fp32 ones unless the CPU has AMX. In
    pure bf16 most updates of an AdamW step at lr 5e-5 round away (57 % of N(0, 0.02²) weights moved,
    tests/test_precision.py)."""
    dev = torch.device(device).type
    bf16_ok = dev != "cuda" or torch.cuda.is_bf16_supported()
    if setting == "auto":
        setting = "bf16-mixed" if storage != torch.float32 and dev == "cuda" and bf16_ok else "fp32"
    if setting == "fp32":
        return Precision("fp32", storage, torch.float32, None, dev)
    if setting == "bf16-mixed":
        if not bf16_ok:
            raise RALError("precision=bf16-mixed needs a GPU with bfloat16 support; this one has none — use "
                           "precision=fp32 (or auto)")
        return Precision("bf16-mixed", storage, storage, torch.bfloat16, dev)
    raise RALError(f"unknown precision '{setting}'; choose auto, fp32 or bf16-mixed")


def apply_precision(model: torch.nn.Module, prec: Precision) -> None:
    """Cast in place: trainable parameters to fp32 (masters), frozen ones to `prec.frozen`. Set requires_grad
    first. Tied weights are one Parameter, so they stay tied."""
    if prec.mode == "fp32":
        model.float()  # buffers too: the whole forward computes in fp32
        return
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if p.requires_grad else prec.frozen)


def storage_state_dict(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> dict:
    """The model's state dict with each floating tensor back in its checkpoint dtype (`dtypes`, by key), tied tensors
    still shared, so save_pretrained drops the alias as it does for the model's own state dict."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        dt = dtypes.get(k, v.dtype)
        if v.is_floating_point() and v.dtype != dt:
            key = (v.data_ptr(), dt, tuple(v.shape), v.stride())
            if key not in seen:
                seen[key] = v.detach().to(dt)
            v = seen[key]
        out[k] = v
    return out


# ---- the machine, the models and the optimizer of a run ---------------------------------------------------
def accelerator_for(cfg, accelerator=None):
    """The run's accelerate.Accelerator (`accelerator` if given); on the CPU with the config's thread count."""
    from accelerate import Accelerator  # imports half of the torch ecosystem: only training runs need it

    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RALError("device=cuda but no CUDA GPU is visible; use device=auto or cpu")
    if use_cpu:
        torch.set_num_threads(max(1, cfg.threads))
    return accelerator or Accelerator(cpu=use_cpu)


def optimizer_for(model, cfg):
    """(AdamW over the trainable parameters, its LR schedule over every update of the run)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, cfg.steps * cfg.updates_per_step))


def prepare_student(model, cfg, device):
    """The student as the config trains it: vision frozen or not, LoRA, fp32 masters. Returns (model, precision,
    the checkpoint's dtypes by state-dict key, the frozen reference of the KL term or None: with LoRA the
    reference is the base model, the adapters disabled)."""
    precision = resolve_precision(cfg.precision, model.dtype, device)
    saved_dtypes = {k: v.dtype for k, v in model.state_dict().items()}  # what checkpoints write back
    for n, p in model.named_parameters():
        p.requires_grad_(not (cfg.freeze_vision and is_vision_param(n)))
    if cfg.train_layers != "all" or cfg.train_modules != "all":
        restrict_training(model, cfg.train_layers, cfg.train_modules)
    if cfg.lora_r > 0:
        model = add_lora(model, cfg)
    apply_precision(model, precision)  # after LoRA, so its adapters are fp32 like every trainable weight
    ref = None
    if cfg.lora_r == 0 and cfg.beta > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        for p in ref.parameters():  # frozen: no fp32 masters needed (values unchanged)
            p.data = p.data.to(precision.frozen)
    return model, precision, saved_dtypes, ref


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# train_modules → the name parts (HF naming) of the weights it keeps trainable; q/k norms shape the logits too
_MODULE_PARTS = {"attention": {"self_attn"}, "qk": {"q_proj", "k_proj", "q_norm", "k_norm"}}


def restrict_training(model, layers, modules: str = "all") -> None:
    """train_layers / train_modules: freeze every language-model parameter outside the chosen decoder layers
    (embeddings, final norm and output head too) and, within them, outside the chosen modules; the vision path
    keeps freeze_vision's setting. Adam moves every trained weight by about lr per update whatever its gradient's
    size: this bounds which weights a short run can drift."""
    from ral_core.config import _index_list
    lm = {n: p for n, p in model.named_parameters() if not is_vision_param(n)}
    layer = {n: int(m.group(1)) for n in lm if (m := _LAYER_INDEX.search(n))}
    n_layers = max(layer.values(), default=-1) + 1
    if not n_layers:
        raise RALError(f"train_layers={layers!r}: this model's language-model parameters name no decoder layers "
                       "(no 'layers.N.'); use train_layers=all and train_modules=all")
    if layers == "all":
        keep = None
    else:
        items = list(range(n_layers)) if layers == "layers" else [-1] if layers == "last" else _index_list(layers, None)
        bad = [i for i in items if not -n_layers <= i < n_layers]
        if bad:
            raise RALError(f"train_layers: layer {bad[0]} does not exist; the model has {n_layers} decoder layers "
                           f"(0–{n_layers - 1}, or −1 for the last)")
        keep = {i % n_layers for i in items}
    parts = _MODULE_PARTS.get(modules)
    for n, p in lm.items():
        if (keep is not None and layer.get(n) not in keep) or (parts and not parts & set(n.split("."))):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in lm.values()):
        raise RALError(f"train_layers={layers!r} with train_modules={modules!r} leaves no weight of this model's "
                       "language model to train (its layers there have no such module); choose other layers or "
                       "train_modules=all")


def load_teacher(cfg, student, device, precision: Precision):
    """The frozen teacher of OPAD / token distillation, or None where the config uses none."""
    if not (cfg.teacher and (cfg.gamma_opad > 0 or cfg.lambda_token_kl > 0)):
        return None
    teacher = load_adapter(cfg.teacher, device=str(device),
                           dtype=torch.float32 if precision.compute is None else None)
    teacher.model.requires_grad_(False)
    if len(teacher.tokenizer) != len(student.tokenizer):
        raise RALError("the teacher must share the student's tokenizer (same vocabulary) for OPAD")
    return teacher


def add_lora(model, cfg):
    """LoRA adapters on the language model's attention projections."""
    from peft import LoraConfig, get_peft_model  # peft is imported only by runs that use it
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not is_vision_param(n) and n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=targets))


def tensorboard_writer(out: Path):
    """A SummaryWriter under out/tb, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency, slow to import
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


# ---- seeds and the LR schedule -------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg, total_updates: int):
    """LambdaLR factor of optimizer update u: linear warm-up over `warmup_steps`, then the config's schedule."""
    warm = cfg.warmup_steps * cfg.updates_per_step

    def f(u):
        if cfg.warmup_steps and u < warm:
            return (u + 1) / warm
        frac = u / max(1, total_updates)
        if cfg.schedule == "linear":
            return max(0.0, 1 - frac)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0
    return f


# ---- a JSON tree plus a flat tensor dict -------------------------------------------------------------------
def _encode(obj, tensors: dict, key: str):
    """Replace tensors/arrays by references into `tensors`; tag tuples and non-string-keyed dicts so that
    decoding restores the exact Python types (torch compares param_groups by value, RNG needs tuples)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        # raw bytes + dtype/shape: exact for every numpy dtype, including uint32 (not a safetensors type)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).view(np.uint8).reshape(-1).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = [(k, _encode(v, tensors, f"{key}.{k}")) for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return dict(items)
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"cannot store dict keys of types {sorted({type(k).__name__ for k in obj})} at {key}")
        return {"__dict__": [[k, v] for k, v in items]}
    raise TypeError(f"cannot store a {type(obj).__name__} in the trainer state (at {key}) without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        raw = tensors[obj["__ndarray__"]].numpy()
        return raw.view(np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---- RNG streams ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(st: dict):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"].to(torch.uint8))
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in st["cuda"]])


# ---- save / load -------------------------------------------------------------------------------------------
def save_state(directory, step: int, optimizer, scheduler, history_len: int) -> None:
    """Write the trainer state of `step` into `directory` (an unpublished temp folder: no atomicity here)."""
    from safetensors.torch import save_file

    d = Path(directory)
    tensors: dict = {}
    tree = {"format": FORMAT, "version": VERSION, "step": int(step), "history_len": int(history_len),
            "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer"),
            "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler"),
            "rng": _encode(rng_state(), tensors, "rng")}
    if RANK_RNG.get():
        tree["rng_ranks"] = _encode(RANK_RNG.get(), tensors, "rng_ranks")
    save_file(tensors, str(d / STATE_TENSORS))
    (d / STATE_JSON).write_text(json.dumps(tree))


def load_state(directory, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG streams from `directory`; returns {"step", "history_len"}.
    A folder with only the old pickle `trainer_state.pt` is refused without opening it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / STATE_JSON).is_file() or not (d / STATE_TENSORS).is_file():
        if (d / LEGACY_PICKLE).exists():
            raise RALError(f"checkpoint '{d}' stores its trainer state as a pickle ({LEGACY_PICKLE}), which can run "
                           "code when opened, so it is refused; resume from a checkpoint written by this version")
        raise RALError(f"checkpoint '{d}' has no trainer state ({STATE_JSON} + {STATE_TENSORS}); "
                       "it cannot be resumed (its weights still load as a model)")
    try:
        tree = json.loads((d / STATE_JSON).read_text())
        tensors = load_file(str(d / STATE_TENSORS))
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if tree.get("version") != VERSION:
            raise ValueError(f"format version {tree.get('version')}, this version reads {VERSION}")
        st = {k: _decode(tree[k], tensors) for k in ("optimizer", "scheduler", "rng")}
        st["rng"] = _rank_rng(tree, tensors, st["rng"])
        step, history_len = int(tree["step"]), int(tree["history_len"])
    except (ValueError, KeyError, TypeError, OSError, RecursionError, SafetensorError) as e:
        raise RALError(f"the trainer state in checkpoint '{d}' is unreadable ({e}); resume from another "
                       "checkpoint") from None
    try:
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RALError(f"the trainer state in checkpoint '{d}' does not match this run's optimizer "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); resume with the same config") from None
    return {"step": step, "history_len": history_len}


def _rank_rng(tree: dict, tensors: dict, default: dict) -> dict:
    """This process's RNG streams: its own when the checkpoint holds one per process of a run of this size."""
    import torch.distributed as dist
    if "rng_ranks" not in tree or not (dist.is_available() and dist.is_initialized()):
        return default
    ranks = _decode(tree["rng_ranks"], tensors)
    return ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else default


# ---- leftovers of killed writers ----------------------------------------------------------------------------
def _start_time(pid: int) -> float | None:
    """Wall-clock start of a live process (Linux /proc), None if it is gone or a zombie; inf if unknown."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # someone else's live process
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # killed but not reaped: it writes nothing any more
            return None
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return float("-inf")  # cannot tell: treat as a live writer


def remove_stale_tmp(ck_root) -> list[Path]:
    """Delete `.tmp-step-*-<pid>` folders of checkpoint writes that were killed mid-way: their process is gone,
    or the pid now belongs to a process that started after the folder was last written (a restarted
    container reuses pids, often its own). A write in flight is never touched."""
    removed = []
    root = Path(ck_root)
    if not root.is_dir():
        return removed
    for p in root.glob(".tmp-step-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            started = _start_time(pid)
            stale = started is None or started > p.stat().st_mtime + 2  # 2 s: btime is whole seconds
        except (IndexError, ValueError):
            stale = True  # not a name this code writes
        except OSError:
            continue  # vanished meanwhile
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---- checkpoints ---------------------------------------------------------------------------------------------
def check_output_dir(out: Path, resume: bool) -> None:
    """Remove leftovers of killed checkpoint writes; unless resuming, refuse a folder that holds another run's
    checkpoints or metrics (nothing is overwritten)."""
    remove_stale_tmp(out / "checkpoints")  # .tmp-step-* of a killed write: not "checkpoints of another run"
    if resume:
        return
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise RALError(f"'{out}' already holds checkpoints of another run; pass resume (ral train --resume) "
                       "or choose a new output_dir — nothing was overwritten")
    if (out / "metrics.jsonl").exists():  # e.g. a run killed during its first checkpoint write
        raise RALError(f"'{out}' holds the metrics of an earlier run (metrics.jsonl) and no checkpoint to "
                       "resume from; choose a new output_dir or remove that file — nothing was overwritten")


def append_metrics(out: Path, m: dict, tb=None) -> None:
    """One step's metrics as a line of out/metrics.jsonl (and its numbers to tensorboard)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(m) + "\n")
    for k, v in m.items() if tb else ():
        if isinstance(v, (int, float)):
            tb.add_scalar(k, v, m["step"])


def latest_checkpoint(out) -> Path | None:
    f = Path(out) / "checkpoints" / "latest"
    return (Path(out) / "checkpoints" / f.read_text().strip()) if f.exists() else None


def write_checkpoint(ck_root: Path, step: int, model, adapter, cfg, optimizer, scheduler, history_len: int,
                     precision: Precision, saved_dtypes: dict) -> Path:
    """Atomically write ck_root/step-N (weights loadable by load_adapter + the trainer state), point `latest` at
    it and keep the newest `keep_checkpoints`. `model` is the unwrapped model with its full (gathered) state."""
    ck_root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(ck_root)  # writes of killed processes (e.g. during a run that was resumed)
    final = ck_root / f"step-{step:05d}"
    tmp = ck_root / f".tmp-step-{step:05d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_r > 0:
        model.save_pretrained(tmp)  # the LoRA adapters only, fp32 as trained (PEFT's convention)
        (tmp / "ral_base_model.txt").write_text(str(cfg.model))
    else:
        _save_weights(model, tmp, precision.storage, saved_dtypes)
    adapter.tokenizer.save_pretrained(tmp)
    adapter.image_processor.save_pretrained(tmp)
    save_state(tmp, step, optimizer, scheduler, history_len)
    (tmp / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = ck_root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ck_root / "latest")
    kept = sorted(p for p in ck_root.glob("step-*") if p.is_dir())
    for old in kept[:-max(1, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_weights(model, directory: Path, storage: torch.dtype, saved_dtypes: dict) -> None:
    """Weights in the checkpoint's dtypes (a bf16 model stays a bf16 checkpoint), plus the fp32 master copy of the
    trainable weights that they would round (MASTER_WEIGHTS), so that resuming continues exactly."""
    from safetensors.torch import save_file

    model.save_pretrained(directory, state_dict=storage_state_dict(model, saved_dtypes))
    cfg_file = directory / "config.json"
    c = json.loads(cfg_file.read_text())
    if c.get("dtype") != str(storage).removeprefix("torch."):  # save_pretrained writes the fp32 masters' dtype
        c["dtype"] = str(storage).removeprefix("torch.")
        cfg_file.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    masters = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
               if p.requires_grad and p.dtype != saved_dtypes.get(n, p.dtype)}
    if masters:
        save_file(masters, str(directory / MASTER_WEIGHTS))


def read_checkpoint(path: Path, model, lora: bool, optimizer, scheduler) -> int:
    """Load weights (and fp32 masters), optimizer, scheduler and RNG streams from checkpoint `path` into the
    unwrapped `model`; returns its step. Refuses pickles."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict  # peft is imported only by runs that use it
        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    else:
        # from_pretrained maps the on-disk key names (which v5 may convert) back to the module's names
        saved = type(model).from_pretrained(path)
        try:
            model.load_state_dict(saved.state_dict())
        except RuntimeError as e:
            raise RALError(f"checkpoint '{path}' does not match the model: {str(e).splitlines()[0]}") from None
        del saved
        if (path / MASTER_WEIGHTS).exists():  # the fp32 masters the saved bf16/fp16 weights were rounded from
            params = dict(model.named_parameters())
            masters = load_file(str(path / MASTER_WEIGHTS))
            bad = [n for n, t in masters.items() if n not in params or params[n].shape != t.shape]
            if bad:
                raise RALError(f"checkpoint '{path}': {MASTER_WEIGHTS} does not match the model ({bad[0]})")
            model.load_state_dict(masters, strict=False)  # (not param.copy_: a sharded parameter takes it too)
    return int(load_state(path, optimizer, scheduler)["step"])


def truncate_metrics(mfile: Path, step: int) -> list[dict]:
    """Drop metric lines written after `step` (an interrupted step), so the log stays exact; returns the rest."""
    lines = [ln for ln in mfile.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
    mfile.write_text("".join(ln + "\n" for ln in keep))
    return [json.loads(ln) for ln in keep]
