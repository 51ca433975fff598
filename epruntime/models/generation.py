"""Greedy decoding with the expert-parallel model, in lockstep over the ranks (the library part of
``epruntime generate``): every forward is a collective, so every rank runs every step, with empty
batches where it has no prompt left."""

from __future__ import annotations

import torch
import torch.distributed as dist

from epruntime.parallel.runtime import Runtime


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
