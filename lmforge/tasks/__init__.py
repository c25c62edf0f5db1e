"""Labeled tasks for fine-tuning: task configuration, example readers and dev metrics (model-independent)."""

from lmforge.tasks.config import GLUE_TASKS, TaskConfig, resolve_task_config
from lmforge.tasks.datasets import Example, TaskData, load_task, read_examples, subsample
from lmforge.tasks.metrics import compute_metrics, selection_metric

__all__ = ["GLUE_TASKS", "Example", "TaskConfig", "TaskData", "compute_metrics", "load_task", "read_examples",
           "resolve_task_config", "selection_metric", "subsample"]
