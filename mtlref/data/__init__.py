"""Data: tasks and their readers, split protocols, prompt templates, multi-task samplers."""
from mtlref.data.readers import Example
from mtlref.data.samplers import SCHEMES, MultiTaskSampler, task_probabilities
from mtlref.data.splits import PROTOCOLS, make_splits
from mtlref.data.tasks import (SUPERGLUE_TASKS, TASKS, TaskSpec, extract_answer, get_spec, load_jsonl_tasks,
                               load_task, load_tasks)
from mtlref.data.templates import PROMPTS, render, t5_input, t5_label, t5_target
from mtlref.metrics import COMMONSENSE_TASKS, GLUE_TASKS

__all__ = ["COMMONSENSE_TASKS", "Example", "GLUE_TASKS", "MultiTaskSampler", "PROMPTS", "PROTOCOLS", "SCHEMES",
           "SUPERGLUE_TASKS", "TASKS", "TaskSpec", "extract_answer", "get_spec", "load_jsonl_tasks", "load_task",
           "load_tasks", "make_splits", "render", "t5_input", "t5_label", "t5_target", "task_probabilities"]
