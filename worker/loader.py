"""Loads Hugging Face safetensors checkpoints (single file or sharded with an index) into a model
whose parameters know their own shard. Tensors are read one at a time from memory-mapped files,
so the full checkpoint is never held twice."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Buffers HF checkpoints sometimes carry that we recompute.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    pass


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists missing shards: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}; convert .bin checkpoints "
                              "to safetensors, or pass a .gguf file")
    return files


def resolve_target(name: str, packed: Mapping[str, tuple[str, object]]) -> tuple[str, object]:
    """Checkpoint tensor name -> (our name, shard id), e.g. `...q_proj.weight` ->
    (`...qkv_proj.weight`, "q"); names of unmerged tensors come back unchanged with None."""
    for ckpt_part, (our_part, shard) in packed.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{our_part}."), shard
    return name, None


# A hook that may take a checkpoint tensor for itself (quantized layers): called with the tensor's
# name and a function that reads it; returns True when it consumed the tensor.
Claim = Callable[[str, Callable[[], torch.Tensor]], bool]


def load_weights(model: nn.Module, model_dir: Path, claim: Claim | None = None) -> None:
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    # A pipeline stage loads only its own tensors (and may place one under another name).
    stage_target = getattr(model, "checkpoint_target", None)
    loaded: set[str] = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(_SKIP_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                ours = name if stage_target is None else stage_target(name)
                if ours is None:  # another pipeline stage's tensor
                    continue
                if claim is not None and claim(ours, partial(f.get_tensor, name)):
                    continue
                target, shard_id = resolve_target(ours, packed)
                param = params.get(target)
                if param is None:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has no place in the "
                                          f"model; is config.json for another architecture?")
                loader = getattr(param, "weight_loader", None)
                tensor = f.get_tensor(name)
                with torch.no_grad():
                    if loader is None:
                        param.data.copy_(tensor)
                    elif shard_id is None:
                        loader(param, tensor)
                    else:
                        loader(param, tensor, shard_id)
                loaded.add(target)
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. "
                              f"{', '.join(missing[:5])}")
