"""Datasets: the bundled digit-grid grounding task and a JSONL loader for user data."""
from ral_core.data.grounding import GroundingTask, Sample, TASK_KINDS

__all__ = ["GroundingTask", "Sample", "TASK_KINDS"]
