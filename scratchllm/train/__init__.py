"""Training: the loop every recipe shares, AdamW and schedules, metrics; the pretraining recipe."""

from scratchllm.train.loop import Recipe, TrainLoop, TrainResult
from scratchllm.train.pretrain import PretrainConfig, pretrainer

__all__ = ["PretrainConfig", "Recipe", "TrainLoop", "TrainResult", "pretrainer"]
