"""Model adapters, one file per family. Importing this package registers every family."""
from ral_core.models.base import (TokenGeometry, VLMAdapter, load_adapter, resolve_model_path,
                                  supported_model_types)
from ral_core.models import gemma3, idefics3, llava, qwen2_vl, qwen3_5  # noqa: F401

__all__ = ["TokenGeometry", "VLMAdapter", "load_adapter", "resolve_model_path", "supported_model_types"]
