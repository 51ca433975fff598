"""Configuration: YAML -> frozen dataclasses (:mod:`.schema`), checked before any process group (:mod:`.checks`)."""

from epruntime.config.errors import ConfigError
from epruntime.config.schema import (
    Config,
    MoEConfig,
    RuntimeConfig,
    TopologyConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)

__all__ = [
    "Config",
    "ConfigError",
    "MoEConfig",
    "RuntimeConfig",
    "TopologyConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]
