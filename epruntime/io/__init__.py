"""Weights in and out: HuggingFace names, safetensors checkpoints, FP8 blocks."""
