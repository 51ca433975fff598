"""HuggingFace DeepSeek-V3 safetensors checkpoints, read tensor by tensor so each rank loads only its share.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or
``model-*.safetensors`` shards listed by ``model.safetensors.index.json``. A
:class:`CheckpointReader` opens a shard only when one of its tensors is read (safetensors headers
are parsed, never pickles), records every key and byte it reads, and serves lazy
:class:`TensorView` mappings that plug into :mod:`epruntime.io.weights` (``take``,
``expert_weights``...), so building one MoE layer reads its gate, its shared expert and this
rank's experts, nothing else. FP8 weights (``float8_e4m3fn`` with a ``<name>_scale_inv`` of
block scales, ``quantization_config.weight_block_size``, 128 x 128 as released) of the routed
experts are handed as :class:`~epruntime.io.fp8.Fp8Block` (kept FP8 for DeepGEMM, dequantized once
by the experts otherwise); every other FP8 weight is dequantized to the compute dtype at read:
``w[i, j] * scale_inv[i // 128, j // 128]`` (:func:`~epruntime.io.fp8.dequantize_block_fp8`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from epruntime.config.schema import MoEConfig
from epruntime.io.fp8 import BLOCK, FP8, Fp8Block, Weight, dense
from epruntime.parallel.topology import Topology

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the key and the file."""


@dataclass
class ReadLog:
    """What a reader read: bytes per checkpoint key (scales included) and the shard files it opened."""

    keys: dict[str, int] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)

    @property
    def bytes(self) -> int:
        return sum(self.keys.values())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a HuggingFace checkpoint directory needs it") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-download the file") from None


class CheckpointReader:
    """One checkpoint directory: its config, where each tensor lives, and the shards opened so far."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        self.hf_config = _read_json(self.path / CONFIG)
        quant = self.hf_config.get("quantization_config") or {}
        self.block: tuple[int, int] = tuple(quant.get("weight_block_size", BLOCK))
        self.log = ReadLog()
        self._open: dict[str, Any] = {}  # shard file name -> safetensors handle
        self.weight_map = self._weight_map()  # key -> shard file name

    def _weight_map(self) -> dict[str, str]:
        if (self.path / INDEX).is_file():
            weight_map = _read_json(self.path / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{self.path / INDEX}: has no 'weight_map' object; re-download the index")
            return weight_map
        if (self.path / SINGLE).is_file():
            return dict.fromkeys(self._file(SINGLE).keys(), SINGLE)
        pickled = [name for name in PICKLED if (self.path / name).exists()]
        if pickled:
            raise CheckpointError(
                f"{self.path}: only safetensors checkpoints are read (nothing is unpickled), found {pickled[0]}; "
                f"convert it to safetensors first"
            )
        raise CheckpointError(f"{self.path}: no {SINGLE} and no {INDEX}; point --checkpoint at a HF model directory")

    def _file(self, name: str) -> Any:
        """The open handle of one shard, opened (header parsed and checked) on first use."""
        if name not in self._open:
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {INDEX} but missing; re-download the checkpoint")
            try:
                self._open[name] = safe_open(str(file), framework="pt")
            except SafetensorError as exc:
                raise CheckpointError(
                    f"{file}: unreadable safetensors file ({exc}); it is truncated or corrupt, re-download it"
                ) from None
            self.log.files.add(name)
        return self._open[name]

    def close(self) -> None:
        """Drop every open shard handle (reads after this reopen them)."""
        self._open.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def where(self, key: str) -> str:
        """The file ``key`` lives in, or the file that says it is absent."""
        if key in self.weight_map:
            return f"{key!r} in {self.path / self.weight_map[key]}"
        listing = INDEX if (self.path / INDEX).is_file() else SINGLE
        return f"{key!r}, absent from {self.path / listing}"

    def _handle(self, key: str) -> Any:
        if key not in self.weight_map:
            raise CheckpointError(f"checkpoint has no {self.where(key)}")
        return self._file(self.weight_map[key])

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the shard header, without reading its data."""
        handle = self._handle(key)
        try:
            return tuple(handle.get_slice(key).get_shape())
        except SafetensorError as exc:
            raise CheckpointError(f"{self.where(key)}: cannot be read ({exc}); re-download the file") from None

    def read(self, key: str) -> torch.Tensor:
        """One stored tensor, as stored (counted in :attr:`log`)."""
        handle = self._handle(key)
        try:
            tensor = handle.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.where(key)}: cannot be read ({exc}); re-download the file") from None
        self.log.keys[key] = tensor.numel() * tensor.element_size()
        return tensor

    def stored(self, key: str) -> Weight:
        """``key`` as stored: an FP8 weight as an :class:`Fp8Block` with its (checked) block scales in fp32,
        any other tensor as it is (counted in :attr:`log`, scales included)."""
        tensor = self.read(key)
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self.weight_map:
            raise CheckpointError(f"FP8 tensor {self.where(key)} has no {scale_key!r} block scales")
        if tensor.dim() != 2:
            raise CheckpointError(f"FP8 tensor {self.where(key)} has shape {tuple(tensor.shape)}; expected a matrix")
        blocks = (math.ceil(tensor.shape[0] / self.block[0]), math.ceil(tensor.shape[1] / self.block[1]))
        if self.shape(scale_key) != blocks:
            raise CheckpointError(
                f"{self.where(scale_key)} has shape {self.shape(scale_key)}, expected {blocks} "
                f"({self.block[0]}x{self.block[1]} blocks of the {tuple(tensor.shape)} weight)"
            )
        return Fp8Block(tensor, self.read(scale_key).float(), self.block)

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """``key`` as a dense tensor: an FP8 weight dequantized to ``dtype`` with its block scales."""
        return dense(self.stored(key), dtype)

    def view(self, prefix: str, dtype: torch.dtype) -> TensorView:
        """The tensors under ``prefix`` (e.g. ``model.layers.3.mlp.``) as a lazy mapping."""
        return TensorView(self, prefix, dtype)

    def moe_config(self, **overrides: Any) -> MoEConfig:
        """The MoE layer config of ``config.json`` (``overrides`` such as ``dtype`` win)."""
        return MoEConfig.from_hf(self.hf_config, **overrides)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek-V3 layout: the first ``first_k_dense_replace`` layers are dense, the rest MoE."""
        return layer_idx >= int(self.hf_config.get("first_k_dense_replace", 0))

    def moe_layer(self, layer_idx: int, cfg: MoEConfig) -> TensorView:
        """The weights of MoE layer ``layer_idx`` (names relative to ``mlp.``), checked against ``cfg``."""
        if not 0 <= layer_idx < self.num_layers or not self.is_moe_layer(layer_idx):
            dense = self.hf_config.get("first_k_dense_replace", 0)
            raise CheckpointError(
                f"{self.path / CONFIG}: layer {layer_idx} is not an MoE layer (layers {dense}..{self.num_layers - 1} "
                f"are; first_k_dense_replace={dense})"
            )
        check_model_config(cfg, self)
        return self.view(f"model.layers.{layer_idx}.mlp.", cfg.torch_dtype)


class TensorView(Mapping[str, Weight]):
    """Checkpoint tensors under a prefix; indexing reads one tensor from its shard: a routed expert's FP8
    weight as an :class:`Fp8Block`, any other FP8 weight dequantized to ``dtype``."""

    def __init__(self, reader: CheckpointReader, prefix: str, dtype: torch.dtype) -> None:
        self.reader, self.prefix, self.dtype = reader, prefix, dtype

    def __getitem__(self, key: str) -> Weight:
        if key not in self:
            raise KeyError(f"checkpoint has no {self.where(key)}")
        full = self.prefix + key
        return self.reader.stored(full) if _EXPERT_KEY.match(full) else self.reader.tensor(full, self.dtype)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.prefix + key in self.reader

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        return (k[n:] for k in self.reader.weight_map if k.startswith(self.prefix) and not k.endswith(SCALE_SUFFIX))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def where(self, key: str) -> str:
        """Where ``key`` lives (used by :func:`epruntime.io.weights.take` in its errors)."""
        return self.reader.where(self.prefix + key)


def as_reader(checkpoint: str | Path | CheckpointReader) -> CheckpointReader:
    """A reader for a checkpoint directory, or the given reader itself (to share its handles and log)."""
    return checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)


def check_model_config(cfg: MoEConfig, reader: CheckpointReader) -> None:
    """Fail unless ``cfg`` (the runtime's model section) agrees with every field config.json sets (dtype aside)."""
    ckpt = reader.moe_config()
    diff = [
        f"{f.name}={getattr(cfg, f.name)!r} (checkpoint {getattr(ckpt, f.name)!r})"
        for f in fields(cfg)
        if f.name in reader.hf_config and f.name != "dtype" and getattr(cfg, f.name) != getattr(ckpt, f.name)
    ]
    if diff:
        raise CheckpointError(
            f"model config differs from {reader.path / CONFIG}: {', '.join(diff)}; "
            f"build the model section from the checkpoint (MoEConfig.from_hf)"
        )


def resident_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a dense checkpoint tensor is held in: the router gate in fp32, every other weight in ``dtype``."""
    return torch.float32 if ".mlp.gate." in key else dtype


def resident_bytes(key: str, shape: tuple[int, ...], dtype: torch.dtype, grouped_gemm: str = "auto") -> int:
    """Bytes a checkpoint tensor takes once loaded. Under ``grouped_gemm: deep_gemm`` a routed expert's weight is
    held as FP8 plus fp32 scales of 128 x 128 blocks (FP8 as stored, dense quantized at load); otherwise every
    weight is dense, at :func:`resident_dtype`."""
    numel = math.prod(shape)
    if grouped_gemm == "deep_gemm" and _EXPERT_KEY.match(key):
        blocks = math.prod(math.ceil(n / b) for n, b in zip(shape[-2:], BLOCK, strict=True))
        return numel * FP8.itemsize + blocks * torch.float32.itemsize
    return numel * resident_dtype(key, dtype).itemsize


def _weight_bytes_by_expert(
    reader: CheckpointReader, dtype: torch.dtype, grouped_gemm: str
) -> tuple[dict[int, int], int]:
    """Loaded bytes of each routed expert id over every MoE layer, and of everything else (from headers)."""
    per_expert: dict[int, int] = {}
    replicated = 0
    for key in reader.weight_map:
        layer = _LAYER_KEY.match(key)
        if key.endswith(SCALE_SUFFIX) or (layer and int(layer.group(1)) >= reader.num_layers):
            continue
        size = resident_bytes(key, reader.shape(key), dtype, grouped_gemm)
        expert = _EXPERT_KEY.match(key)
        if expert:
            e = int(expert.group(2))
            per_expert[e] = per_expert.get(e, 0) + size
        else:
            replicated += size
    return per_expert, replicated


def checkpoint_weight_bytes_per_rank(
    path: str | Path | CheckpointReader, topo: Topology, dtype: torch.dtype | None = None, grouped_gemm: str = "auto"
) -> list[dict[str, int]]:
    """Bytes of weights each rank of ``topo`` holds once loaded, in rank order (from shard headers only).

    ``routed_experts``: its own experts of every MoE layer; ``replicated``: everything else (attention,
    norms, dense layers, gates, shared experts, embeddings); ``dtype`` defaults to config.json's.
    Routed experts count as FP8 plus block scales under ``grouped_gemm`` ``deep_gemm``, at ``dtype``
    otherwise; every other FP8 weight counts at ``dtype`` (it is dequantized); layers past
    ``num_hidden_layers`` (MTP) are skipped.
    """
    reader = as_reader(path)
    per_expert, replicated = _weight_bytes_by_expert(reader, dtype or reader.moe_config().torch_dtype, grouped_gemm)
    out = []
    for rank in range(topo.world_size):
        routed = sum(per_expert.get(e, 0) for e in topo.expert_range(rank))
        out.append({"routed_experts": routed, "replicated": replicated, "total": routed + replicated})
    return out


def checkpoint_weight_bytes(
    path: str | Path | CheckpointReader,
    rank: int,
    topo: Topology,
    dtype: torch.dtype | None = None,
    grouped_gemm: str = "auto",
) -> dict[str, int]:
    """What :func:`checkpoint_weight_bytes_per_rank` gives for rank ``rank``."""
    return checkpoint_weight_bytes_per_rank(path, topo, dtype, grouped_gemm)[rank]


__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ReadLog",
    "TensorView",
    "as_reader",
    "check_model_config",
    "checkpoint_weight_bytes",
    "checkpoint_weight_bytes_per_rank",
    "resident_bytes",
    "resident_dtype",
]
