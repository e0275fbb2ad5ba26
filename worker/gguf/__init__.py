"""GGUF models: reading llama.cpp files and converting them into Hugging Face folders.

`convert_gguf` is the entry point most callers want; `open_gguf` + `packed_tensors` give the raw
quantized blocks for kernels that run them without dequantizing.
"""

from worker.gguf.convert import CONVERTER_VERSION, MARKER_FILE, convert_gguf
from worker.gguf.errors import GGUFError
from worker.gguf.reader import SUPPORTED_ARCHITECTURES, GGUFFile, hf_config, open_gguf
from worker.gguf.tokenizer import build_tokenizer, tokenizer_config
from worker.gguf.weights import SUPPORTED_QUANT_TYPES, PackedTensor, hf_tensors, packed_tensors

__all__ = [
    "CONVERTER_VERSION",
    "MARKER_FILE",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_QUANT_TYPES",
    "GGUFError",
    "GGUFFile",
    "PackedTensor",
    "build_tokenizer",
    "convert_gguf",
    "hf_config",
    "hf_tensors",
    "open_gguf",
    "packed_tensors",
    "tokenizer_config",
]
