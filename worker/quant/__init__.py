"""Weight-only quantization: int8 (per channel) and int4 (group-wise) linears, quantized at load
or read from GPTQ / AWQ checkpoints and GGUF Q4_0 / Q4_1 / Q8_0 blocks."""

from worker.quant.apply import load_quantized, quantize_model
from worker.quant.checkpoint import CheckpointQuant, read_checkpoint_quant
from worker.quant.linear import Int4Linear, Int4Part, Int8Linear, Int8Part

__all__ = [
    "CheckpointQuant",
    "Int4Linear",
    "Int4Part",
    "Int8Linear",
    "Int8Part",
    "load_quantized",
    "quantize_model",
    "read_checkpoint_quant",
]
