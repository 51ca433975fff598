"""epruntime: an expert-parallel inference runtime for DeepSeek-V3-style MoE layers."""

from epruntime.config import Config, ConfigError, MoEConfig, load_config
from epruntime.layer.moe import EPMoE
from epruntime.parallel.runtime import Runtime, init_runtime

__all__ = ["Config", "ConfigError", "EPMoE", "MoEConfig", "Runtime", "init_runtime", "load_config"]
__version__ = "0.1.0"
