"""Fine-tuning recipes (classification, instructions) and LoRA, applied to a built model."""
