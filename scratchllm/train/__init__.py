"""Pretraining: the trainer loop, AdamW and schedules, checkpoints, metrics."""

from scratchllm.train.checkpoint import find_checkpoint, load_for_inference
from scratchllm.train.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "find_checkpoint", "load_for_inference"]
