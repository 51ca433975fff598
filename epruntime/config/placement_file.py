"""``runtime.placement``: which logical expert each physical expert slot holds, read and checked before any
process group exists.

A placement file is JSON ``{"phy2log": [[...], ...]}``: one row of ``E + R`` logical expert ids per MoE
layer in model order (``epruntime eplb`` writes it; one row applies to every layer; a standalone layer
uses row 0). Physical slot ``p`` lives on EP rank ``p // ((E + R) / W)``; a rank may hold two replicas of
one expert, and every logical expert needs at least one.
"""

from __future__ import annotations

import json
from pathlib import Path

from epruntime.config.errors import ConfigError

CONTIGUOUS = "contiguous"
FIX = "write one with `epruntime eplb --config YAML --expert-load LOAD.json --out PLACEMENT.json`"


def read_rows(path: str, key: str, where: str, fix: str) -> list[list]:
    """The rows of a JSON file ``{key: [[...], ...]}`` (one per MoE layer); one-line errors start with ``where``
    and end with ``fix``."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: not valid JSON ({str(exc).splitlines()[0]}); {fix}") from None
    rows = data.get(key) if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ConfigError(f'{where}: expected {{"{key}": [[...], ...]}} with one row per MoE layer; {fix}')
    return rows


def read_phy2log(path: str, num_experts: int, num_slots: int) -> list[list[int]]:
    """The rows of a placement file, each checked: ``num_slots`` ids in ``[0, num_experts)``, every expert there."""
    where = f"runtime.placement: {path}"
    rows = read_rows(path, "phy2log", where, f"pass a placement JSON or 'contiguous'; {FIX}")
    for i, row in enumerate(rows):
        if len(row) != num_slots:
            raise ConfigError(
                f"{where}: row {i} has {len(row)} slots, expected model.n_routed_experts + runtime.redundant_experts "
                f"= {num_slots}; write the placement for this model and runtime.redundant_experts"
            )
        bad = [e for e in row if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < num_experts]
        if bad:
            raise ConfigError(f"{where}: row {i} holds {bad[0]!r}, not a logical expert id in [0, {num_experts})")
        missing = sorted(set(range(num_experts)) - set(row))
        if missing:
            raise ConfigError(
                f"{where}: row {i} has no replica of expert(s) {missing[:8]}; every logical expert needs a slot"
            )
    return rows


def check_placement_rows(path: str, num_rows: int, num_moe_layers: int) -> None:
    """A model of ``num_moe_layers`` MoE layers needs one row, or one per layer."""
    if num_rows != 1 and num_rows < num_moe_layers:
        raise ConfigError(
            f"runtime.placement: {path} has {num_rows} rows for {num_moe_layers} MoE layers; give one row per MoE "
            f"layer in model order, or a single row for all"
        )
