"""``epruntime generate``: greedy decoding with a HuggingFace DeepSeek-V3 checkpoint, in every launched rank.

Every model field that the checkpoint's ``config.json`` sets comes from it (``--dtype`` picks the
compute dtype); the rest of the config (topology, runtime, model fields such as
``max_nodes_per_token``) comes from ``--config`` and ``--set`` or, without ``--config``, the topology
from the launcher: ``WORLD_SIZE / LOCAL_WORLD_SIZE`` nodes of ``LOCAL_WORLD_SIZE`` ranks. Prompts are dealt to
ranks round-robin (attention is data-parallel); ranks with fewer prompts, or none, still run every
MoE layer of every step, so decoding stays in lockstep. Rank 0 prints one line per prompt, in
order: its generated ids, comma-separated, up to and including the first EOS id of the checkpoint's
``eos_token_id`` (as transformers' ``generate`` stops); ``--ignore-eos`` always runs ``--max-new-tokens``
steps. Decoding ends early once every prompt on every rank has reached EOS.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from epruntime.cli.checkpoint_config import generate_config
from epruntime.config.schema import ConfigError
from epruntime.io.checkpoint import CheckpointError, CheckpointReader
from epruntime.layer.probe import StageMarks
from epruntime.models.generation import eos_ids, generate_prompts
from epruntime.parallel.runtime import end_rank, init_runtime


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; a ConfigError naming the flag otherwise."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"--prompt-ids {text!r}: token ids must be >= 0")
    return ids


def generate_main(args: argparse.Namespace) -> int:
    """Entry point of ``epruntime generate`` in one launched rank; rank 0 prints the generated ids."""
    try:
        prompts = [parse_ids(text) for text in args.prompt_ids]
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
        reader = CheckpointReader(args.checkpoint)
        cfg = generate_config(reader, args.config, args.overrides, args.dtype)
        vocab = int(reader.hf_config["vocab_size"])
        if any(i >= vocab for prompt in prompts for i in prompt):
            raise ConfigError(f"--prompt-ids: token ids must be < vocab_size={vocab} of {reader.path}/config.json")
    except CheckpointError as exc:
        print(f"epruntime: error: {exc}", file=sys.stderr)
        return 2
    from epruntime.models import DeepseekEP  # imports transformers: only here

    rt = init_runtime(cfg)
    model = DeepseekEP.from_pretrained(reader, rt)
    for layer in model.moe_layers():
        layer.probe = StageMarks()  # a failure names the layer and stage; nothing is timed
    reader.close()
    held, log = model.weight_bytes(), reader.log
    rt.log(
        f"resident weights {held['total'] / 1e6:.2f} MB (routed experts {held['routed_experts'] / 1e6:.2f} MB, "
        f"replicated {held['replicated'] / 1e6:.2f} MB); read {log.bytes / 1e6:.2f} MB from {len(log.files)} files"
    )
    mine = list(range(rt.rank, len(prompts), rt.world_size))
    eos = [] if args.ignore_eos else eos_ids(reader.hf_config)
    outputs = generate_prompts(model, rt, [prompts[i] for i in mine], args.max_new_tokens, eos)
    gathered: list[list[tuple[int, list[int]]]] = [[] for _ in range(rt.world_size)]
    dist.all_gather_object(gathered, list(zip(mine, outputs, strict=True)), group=rt.world_group)
    if rt.rank == 0:
        for _, ids in sorted(pair for part in gathered for pair in part):
            print(",".join(map(str, ids)), flush=True)
    end_rank(rt)
    return 0
