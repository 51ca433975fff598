"""The job's config for a checkpoint (``generate`` and ``plan --checkpoint``): the model from its config.json,
the rest from ``--config`` / ``--set`` or, without ``--config``, the topology from the launcher."""

from __future__ import annotations

import dataclasses

from epruntime.config.placement_file import CONTIGUOUS, check_placement_rows, read_phy2log
from epruntime.config.schema import Config, ConfigError, config_from_dict, load_config
from epruntime.io.checkpoint import CheckpointReader
from epruntime.parallel.launcher import detect_launcher


def generate_config(
    reader: CheckpointReader, config_path: str | None, overrides: list[str], dtype: str | None
) -> Config:
    """The job's config: ``config_path`` (or the launcher's topology) plus ``overrides``, with every model field
    that config.json sets taken from the checkpoint (``dtype`` too, unless given); a placement file must have a
    row per MoE layer of the checkpoint, or one (checked before any process group exists)."""
    ckpt = reader.moe_config(**({"dtype": dtype} if dtype else {}))
    from_ckpt = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt) if f.name in reader.hf_config}
    from_ckpt["dtype"] = ckpt.dtype
    from_ckpt["weight_block_size"] = ckpt.weight_block_size  # from quantization_config, when there is one
    for text in overrides:
        if text.partition("=")[0].strip().removeprefix("model.") in from_ckpt:
            raise ConfigError(f"--set {text}: {reader.path}/config.json sets this field; use --dtype for the dtype")
    if config_path:
        cfg = load_config(config_path, overrides)
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, **from_ckpt))
    else:
        env = detect_launcher()
        topology = {"nnodes": env.num_nodes, "ranks_per_node": env.world_size // env.num_nodes}
        cfg = config_from_dict({"model": dataclasses.asdict(ckpt), "topology": topology}, overrides)
    if cfg.runtime.placement != CONTIGUOUS:  # one placement row per MoE layer, or one for all
        e, path = cfg.model.n_routed_experts, cfg.runtime.placement
        rows = read_phy2log(path, e, e + cfg.runtime.redundant_experts)
        check_placement_rows(path, len(rows), sum(map(reader.is_moe_layer, range(reader.num_layers))))
    return cfg
