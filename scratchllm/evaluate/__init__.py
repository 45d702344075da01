"""Evaluation of fine-tuned models: generated responses, response loss, and judge scores."""
