"""Loading a model's weights with the quantization its config asks for.

Four ways, picked by `load_quantized`:
- float checkpoint, quantization None: plain load.
- float checkpoint, int8 / int4: load as usual, then swap each linear for its quantized form one
  layer at a time (gpt-fast's WeightOnlyInt8QuantHandler shape), so peak memory is the float
  model plus one quantized layer. Each rank quantizes its own shard.
- GPTQ / AWQ checkpoint (quantization_config in config.json): swap the quantized linears in
  first, then load; their tensors go to the layers' `load_part`, the rest through the loader.
- "gguf": the model came from a .gguf; Q4_0/Q4_1/Q8_0 linears take their blocks from the file
  instead of the dequantized copy in the converted folder.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kernels import cpu_w4a8
from worker.config import ConfigError, EngineConfig
from worker.layers.embedding import ParallelLMHead
from worker.layers.linear import LinearBase, ReplicatedLinear, RowParallelLinear
from worker.loader import CheckpointError, checkpoint_files, load_weights, resolve_target
from worker.quant import checkpoint as ckpt
from worker.quant import gguf as gq
from worker.quant.linear import (
    CPU_INT4_GROUP_SIZES,
    GroupInt8Linear,
    Int4Linear,
    Int8Linear,
    QuantLinearBase,
    cpu_group_size,
)

log = logging.getLogger(__name__)

W4A8_GROUP = 32  # w4a8's int4 groups: the dot-product kernel's (kernels/cpu_w4a8.py)


def _linears(model: nn.Module) -> Iterator[tuple[str, LinearBase]]:
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearBase):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def layer_group_size(requested: int, in_features: int, device: torch.device) -> int:
    """`requested` where it divides the layer's (local) input size, else the largest smaller
    supported size that does: SmolLM2's hidden size 576 is 4.5 groups of 128, for example."""
    if in_features % requested == 0 and (device.type != "cpu" or requested in
                                         CPU_INT4_GROUP_SIZES):
        return requested
    for g in reversed(CPU_INT4_GROUP_SIZES):
        if g < requested and in_features % g == 0:
            return g
    raise ConfigError(f"no int4 group size <= {requested} divides a layer's {in_features} input "
                      f"features (supported: {', '.join(map(str, CPU_INT4_GROUP_SIZES))})")


class QuantizedLMHead(nn.Module):
    """The vocab-parallel LM head with a quantized copy of its weight (the embedding it may be
    tied to stays float: lookups need rows, not a matmul)."""

    def __init__(self, head: ParallelLMHead, linear: QuantLinearBase) -> None:
        super().__init__()
        self.tp = head.tp
        self.vocab_size = head.vocab_size
        self.linear = linear

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]


def _quantize_float(base: LinearBase, method: str, group_size: int) -> QuantLinearBase:
    if method == "int8":
        return Int8Linear.from_float(base)
    if method == "w4a8":
        g = layer_group_size(W4A8_GROUP, base.in_features, base.weight.device)
        return Int4Linear.from_float(base, g, int8_activations=True)
    g = layer_group_size(group_size, base.in_features, base.weight.device)
    return Int4Linear.from_float(base, g)


def quantize_model(model: nn.Module, method: str, group_size: int = 128,
                   lm_head: bool = False) -> None:
    """Swap every parallel linear (and optionally the LM head) for its int8 / int4 form."""
    with torch.no_grad():
        for name, base in _linears(model):
            _replace(model, name, _quantize_float(base, method, group_size))
        if lm_head:
            quantize_lm_head(model, method, group_size)


def quantize_lm_head(model: nn.Module, method: str, group_size: int) -> None:
    """Give the LM head (if this stage has one) a quantized copy of its weight. w4a8's head is
    8-bit (per group of 32 where the dot-product kernel runs, else per channel): in int4 it cost
    SmolLM2 +6.6% perplexity (all of w4a8's loss) and dropped a w4a8 self-draft's agreement
    with the target from 96% to 77%; in int8, +0.1%."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, ParallelLMHead):
        return
    with torch.no_grad():
        with torch.device("meta"):
            lin = ReplicatedLinear(head.weight.shape[1], head.weight.shape[0])
        lin.weight = nn.Parameter(head.weight.data, requires_grad=False)
        if method != "w4a8":
            quantized = _quantize_float(lin, method, group_size)
        elif head.tp.size == 1 and lin.weight.device.type == "cpu" and cpu_w4a8.available():
            quantized = GroupInt8Linear.from_float(lin)
        else:
            quantized = Int8Linear.from_float(lin)
        model.lm_head = QuantizedLMHead(head, quantized)


# -- pre-quantized checkpoints ------------------------------------------------------------------

def _ours(model: nn.Module, name: str) -> str | None:
    """A checkpoint name as this model (or pipeline stage) calls it; None: another stage's."""
    stage_target = getattr(model, "checkpoint_target", None)
    return name if stage_target is None else stage_target(name)


def _quantized_targets(model: nn.Module, model_dir: Path, packed: dict) -> set[str]:
    """Our module names whose checkpoint tensors come quantized (some checkpoints keep a few
    layers in float)."""
    targets = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                ours = _ours(model, name) if name.endswith(".qweight") else None
                if ours is not None:
                    targets.add(resolve_target(ours, packed)[0].removesuffix(".qweight"))
    return targets


def _swap_empty(model: nn.Module, names: set[str],
                make: Callable[[LinearBase], QuantLinearBase]) -> dict[str, QuantLinearBase]:
    swapped = {}
    for name, base in _linears(model):
        if name in names:
            swapped[name] = make(base)
            _replace(model, name, swapped[name])
    return swapped


def _check_complete(layers: dict[str, QuantLinearBase], source: object) -> None:
    missing = [n for n, layer in layers.items() if layer.pending]
    if missing:
        raise CheckpointError(f"{source} lacks quantized parts of {len(missing)} layers, e.g. "
                              f"{', '.join(missing[:3])}")


def load_prequantized(model: nn.Module, model_dir: Path, spec: ckpt.CheckpointQuant) -> None:
    packed = getattr(model, "packed_modules", {})
    targets = _quantized_targets(model, model_dir, packed)

    def make(base: LinearBase) -> QuantLinearBase:
        # Row-parallel layers hold K / tp inputs; a "-1" group spans the full K.
        k_full = base.in_features * (base.tp.size if isinstance(base, RowParallelLinear) else 1)
        gs = k_full if spec.group_size == -1 else spec.group_size
        device = base.weight.device
        g = cpu_group_size(gs, base.in_features) if device.type == "cpu" else gs
        if g is None or base.in_features % g:
            raise ConfigError(f"{spec.describe()}: group size {gs} does not fit a layer with "
                              f"{base.in_features} input features on {device.type}")
        return Int4Linear(base, g)

    layers = _swap_empty(model, targets, make)
    staged: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def claim(name: str, read: Callable[[], torch.Tensor]) -> bool:
        prefix, _, suffix = name.rpartition(".")
        if suffix not in ckpt.QUANT_SUFFIXES:
            return False
        # GPTQ/AWQ "scales" are always quantization scales here: no float layer has one.
        parts = staged[prefix]
        parts[suffix] = read()
        if ckpt.is_complete(parts, spec):
            target, shard_id = resolve_target(f"{prefix}.qweight", packed)
            layers[target.removesuffix(".qweight")].load_part(ckpt.to_int4_part(parts, spec),
                                                                shard_id)
            del staged[prefix]
        return True

    with torch.no_grad():
        load_weights(model, model_dir, claim)
    if staged:
        raise CheckpointError(f"{model_dir}: incomplete quantized tensors for "
                              f"{', '.join(sorted(staged)[:3])}")
    _check_complete(layers, model_dir)


# -- GGUF blocks --------------------------------------------------------------------------------

def load_gguf_packed(model: nn.Module, model_dir: Path) -> str:
    from worker.gguf import open_gguf, packed_tensors

    source = gq.source_gguf(model_dir)
    tensors = {ours: t for name, t in packed_tensors(open_gguf(source)).items()
               if (ours := _ours(model, name)) is not None}
    packed = getattr(model, "packed_modules", {})
    types: dict[str, set] = defaultdict(set)
    for name, t in tensors.items():
        if name.endswith(".weight"):
            types[resolve_target(name, packed)[0].removesuffix(".weight")].add(t.quant_type)
    int4 = {n for n, ts in types.items() if ts <= gq.INT4_TYPES}
    int8 = {n for n, ts in types.items() if ts <= gq.INT8_TYPES}
    layers = _swap_empty(model, int4, lambda base: Int4Linear(base, 32))
    layers |= _swap_empty(model, int8, Int8Linear)
    floats = [n for n, _ in _linears(model)]
    if floats:
        log.warning("gguf: %d linears have no int4/int8 mapping and run in float, e.g. %s",
                    len(floats), floats[0])

    def claim(name: str, read: Callable[[], torch.Tensor]) -> bool:
        target, _ = resolve_target(name, packed)
        return target.removesuffix(".weight") in layers and name.endswith(".weight")

    with torch.no_grad():
        load_weights(model, model_dir, claim)  # norms, embeddings, biases, float linears
        for name, t in tensors.items():
            target, shard_id = resolve_target(name, packed)
            layer = layers.get(target.removesuffix(".weight"))
            if layer is None or not name.endswith(".weight"):
                continue
            part = gq.int4_part(t) if isinstance(layer, Int4Linear) else gq.int8_part(t)
            layer.load_part(part, shard_id)
    _check_complete(layers, source)
    head = _gguf_lm_head(model, tensors)
    return f"GGUF blocks of {source.name} ({len(layers)} quantized linears{head})"


def _gguf_lm_head(model: nn.Module, tensors: dict) -> str:
    """The LM head from the file's own blocks (the embedding's when tied), as llama.cpp runs
    it: SmolLM2's Q8_0 embedding is half the bytes of a bf16 head per decoded token. tp 1 only
    (a vocab-parallel head would need the blocks split by rows); returns a note for the log."""
    head = getattr(model, "lm_head", None)
    t = tensors.get("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    if not isinstance(head, ParallelLMHead) or head.tp.size != 1 or t is None:
        return ""
    if t.quant_type in gq.INT4_TYPES:
        make, part = (lambda base: Int4Linear(base, 32)), gq.int4_part(t)
    elif t.quant_type in gq.INT8_TYPES:
        make, part = Int8Linear, gq.int8_part(t)
    else:
        return ""
    with torch.no_grad():
        with torch.device("meta"):
            lin = ReplicatedLinear(head.weight.shape[1], head.weight.shape[0])
        lin.weight = nn.Parameter(head.weight.data, requires_grad=False)  # dtype, device; no copy
        layer = make(lin)
        layer.load_part(part)
        model.lm_head = QuantizedLMHead(head, layer)
    return f", LM head from its {t.quant_type.name} blocks"


# -- entry point --------------------------------------------------------------------------------

def load_quantized(model: nn.Module, model_dir: Path, config: EngineConfig) -> str:
    """Load weights as `config.quantization` and the checkpoint say; returns a short description
    of the weight format for the start-up log."""
    spec = ckpt.read_checkpoint_quant(model_dir)
    if spec is not None:
        if config.quantization is not None:
            raise ConfigError(f"{model_dir} is already quantized ({spec.describe()}); leave "
                              f"--quantization unset (got {config.quantization!r})")
        load_prequantized(model, model_dir, spec)
        return spec.describe()
    if config.quantization == "gguf":
        return load_gguf_packed(model, model_dir)
    load_weights(model, model_dir)
    if config.quantization is None:
        return "float"
    if config.quantization == "w4a8":
        quantize_model(model, "w4a8", W4A8_GROUP, lm_head=True)
        return "int4 group 32 by integer dot products (w4a8), LM head int8"
    quantize_model(model, config.quantization, config.quant_group_size)
    if config.quantization == "int8":
        return "int8 per channel"
    return f"int4 group {config.quant_group_size} (smaller where it does not divide a layer)"
