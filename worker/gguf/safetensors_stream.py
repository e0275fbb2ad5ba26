"""Writing a .safetensors file one tensor at a time.

safetensors.torch.save_file wants every tensor in memory at once; a dequantized model next to
its memory-mapped GGUF would then exist twice. The format is simple enough to stream: a JSON
header with every tensor's dtype, shape and byte range (known up front from the GGUF's shapes),
then the raw little-endian bytes in header order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` (yielded in the order of `shapes`, each with that shape and `dtype`)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(
            f"cannot write {dtype} to safetensors here; use one of {list(_DTYPE_NAMES)}"
        )
    item = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape in shapes.items():
        size = item * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    expected = iter(shapes.items())
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, tensor in tensors:
            want_name, want_shape = next(expected, (None, None))
            if (
                name != want_name
                or tuple(tensor.shape) != tuple(want_shape or ())
                or tensor.dtype != dtype
            ):
                raise ValueError(
                    f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the header entry {want_name} {want_shape} {dtype}"
                )
            # Reinterpret as bytes without copying to numpy dtypes (numpy has no bfloat16).
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors written than the header announces")
