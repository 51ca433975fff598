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
import dataclasses
import sys

import torch
import torch.distributed as dist

from epruntime.config.schema import Config, ConfigError, config_from_dict, load_config
from epruntime.io.checkpoint import CheckpointError, CheckpointReader
from epruntime.parallel.launcher import detect_launcher
from epruntime.parallel.runtime import Runtime, end_rank, init_runtime


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; a ConfigError naming the flag otherwise."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    if any(i < 0 for i in ids):
        raise ConfigError(f"--prompt-ids {text!r}: token ids must be >= 0")
    return ids


def generate_config(
    reader: CheckpointReader, config_path: str | None, overrides: list[str], dtype: str | None
) -> Config:
    """The job's config: ``config_path`` (or the launcher's topology) plus ``overrides``, with every model field
    that config.json sets taken from the checkpoint (``dtype`` too, unless given)."""
    ckpt = reader.moe_config(**({"dtype": dtype} if dtype else {}))
    from_ckpt = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt) if f.name in reader.hf_config}
    from_ckpt["dtype"] = ckpt.dtype
    from_ckpt["weight_block_size"] = ckpt.weight_block_size  # from quantization_config, when there is one
    for text in overrides:
        if text.partition("=")[0].strip().removeprefix("model.") in from_ckpt:
            raise ConfigError(f"--set {text}: {reader.path}/config.json sets this field; use --dtype for the dtype")
    if config_path:
        cfg = load_config(config_path, overrides)
        return cfg.replace(model=dataclasses.replace(cfg.model, **from_ckpt))
    env = detect_launcher()
    topology = {"nnodes": env.num_nodes, "ranks_per_node": env.world_size // env.num_nodes}
    return config_from_dict({"model": dataclasses.asdict(ckpt), "topology": topology}, overrides)


def eos_ids(hf_config: dict) -> list[int]:
    """config.json's ``eos_token_id`` as a list: it may be one id, a list of ids, or absent."""
    eos = hf_config.get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]


def _any_running(finished: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether a row here, or on any rank of ``group``, has not produced an EOS id yet."""
    running = (~finished).any().to(torch.int64).reshape(1)  # [1]
    if group is not None:
        dist.all_reduce(running, op=dist.ReduceOp.MAX, group=group)
    return bool(running.item())


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int] | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Greedy ids ``[B, N]`` after ``input_ids [B, S]``: a prefill forward, then up to ``max_new_tokens - 1``
    one-token steps on a KV cache. Each forward is a collective: every rank calls this with the same
    arguments (``B`` may be 0). With ``eos_token_ids``, a row that produced one repeats the first of them
    from then on (as transformers pads finished rows), and decoding stops when every row of every rank
    of ``group`` has finished, so ``N`` may be smaller than ``max_new_tokens``."""
    cache = model.new_cache()
    eos = torch.tensor(eos_token_ids or [], dtype=torch.long, device=input_ids.device)  # [E]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # [B]
    tokens, out = input_ids, []
    for _ in range(max_new_tokens):
        tokens = model(tokens, cache)[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        if eos.numel():
            tokens = torch.where(finished.unsqueeze(1), eos[0], tokens)
            finished |= torch.isin(tokens.squeeze(1), eos)
        out.append(tokens)
        if eos.numel() and not _any_running(finished, group):
            break
    return torch.cat(out, dim=1).cpu()  # [B, N]


def until_eos(ids: list[int], eos_token_ids: list[int]) -> list[int]:
    """``ids`` up to and including the first EOS id (all of them when there is none)."""
    for i, token in enumerate(ids):
        if token in eos_token_ids:
            return ids[: i + 1]
    return ids


def generate_prompts(
    model: torch.nn.Module,
    rt: Runtime,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of this rank's ``prompts`` (each cut after its first EOS id); prompts of one length
    share a batch. The ranks agree on the number of batches and run them in lockstep, a rank out of prompts
    with empty ``[0, 1]`` batches."""
    eos = eos_token_ids or []
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    batches = list(by_length.values())
    rounds = torch.tensor([len(batches)], device=rt.device)
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=rt.world_group)
    out: list[list[int]] = [[] for _ in prompts]
    for r in range(int(rounds.item())):
        members = batches[r] if r < len(batches) else []
        ids = torch.tensor([prompts[i] for i in members]) if members else torch.zeros(0, 1)  # [B, S]
        new = greedy_generate(model, ids.long().to(rt.device), max_new_tokens, eos, rt.world_group)  # [B, N]
        for i, row in zip(members, new.tolist(), strict=True):
            out[i] = until_eos(row, eos)
    return out


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
    end_rank()
    return 0
