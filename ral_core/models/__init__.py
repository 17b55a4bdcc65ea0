"""Model adapters, one file per family. Importing this package registers every family."""
from pathlib import Path

import torch

from ral_core.errors import RALError
from ral_core.models import base as _base
from ral_core.models.base import TokenGeometry, VLMAdapter, supported_model_types
from ral_core.models import gemma3, idefics3, llava, qwen2_vl, qwen3_5  # noqa: F401

__all__ = ["TokenGeometry", "VLMAdapter", "load_adapter", "resolve_model_path", "supported_model_types"]

TEACHER_MODEL_DIR = _base.DEFAULT_MODEL_DIR.parent / "teacher_model"  # scripts/build_teacher_model.py
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device=None):
    """'auto' → bf16 on CUDA, fp32 elsewhere; a name in DTYPES → that dtype; a torch dtype or None as is."""
    if dtype == "auto":
        return torch.bfloat16 if str(device or "cpu").startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RALError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def resolve_model_path(spec, allow_download: bool | None = None, progress=None) -> str:
    """'default' → the embedded model; 'teacher' → the bundled teacher; an existing directory → itself; a hub id
    (`org/name[@revision]`) → its folder in the local Hugging Face cache, downloaded first where allowed (see
    `ral_core.hub`)."""
    from ral_core import hub

    s = str(spec)
    if s == "teacher" and not Path(s).exists():  # the bundled OPAD / distillation teacher, by name
        if not (TEACHER_MODEL_DIR / "config.json").exists():
            raise RALError(f"the bundled teacher is missing at {TEACHER_MODEL_DIR}; run "
                           "`python scripts/build_teacher_model.py`")
        return str(TEACHER_MODEL_DIR)
    if s not in ("", "default") and hub.is_hub_id(s) and not Path(s).expanduser().exists():
        return hub.resolve(s, allow_download=allow_download, progress=progress, model_types=supported_model_types())
    path = _base.local_model_path(spec)  # 'default', local directories, and the one-line errors for bad paths
    if not Path(path).exists():
        raise RALError(f"'{spec}' is neither a model directory nor a hub id (org/name, optionally @revision)")
    return path


def load_adapter(spec="default", device: str | None = None, dtype=None, allow_download: bool | None = None,
                 progress=None) -> VLMAdapter:
    """Load a model by 'default', local directory or hub id. A hub id comes from the local Hugging Face cache, or
    is downloaded where `ral_core.hub.downloads_allowed(allow_download)` (default: RAL_ALLOW_DOWNLOAD, or on a
    Space); `progress(desc, n, total)` follows the download. `device="auto"` picks a CUDA GPU when one is visible.
    `dtype`: 'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16', 'float16', a torch dtype, or None to keep
    the checkpoint's."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(dtype, device)
    adapter = _base.load_from_path(resolve_model_path(spec, allow_download, progress), spec, device=device,
                                   dtype=dtype)
    adapter.name = str(spec)  # what results and titles show: the spec, not the cache folder
    return adapter
