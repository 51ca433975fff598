"""Whole models built around expert-parallel MoE layers."""

from epruntime.models.deepseek import DeepseekEP

__all__ = ["DeepseekEP"]
