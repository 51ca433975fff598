"""Whole models built around expert-parallel MoE layers."""

from .deepseek import DeepseekEP

__all__ = ["DeepseekEP"]
