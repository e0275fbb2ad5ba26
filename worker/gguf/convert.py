"""Converting a GGUF file into a Hugging Face model folder, once, atomically.

The folder is built in a temporary sibling directory and renamed into place at the end, so a
folder at `out_dir` is always a finished conversion: an interrupted run leaves only a
`.<name>.tmp-*` directory, which the next run ignores (and a later successful run removes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from worker.gguf.errors import GGUFError
from worker.gguf.reader import GGUFFile, check_architecture, hf_config, open_gguf, token_id
from worker.gguf.safetensors_stream import write_safetensors
from worker.gguf.tokenizer import build_tokenizer, end_token_ids, tokenizer_config
from worker.gguf.weights import check_quant_types, hf_shapes, hf_tensors

# Bumped whenever the files written here change, so caches made by older code get rebuilt.
CONVERTER_VERSION = 1
MARKER_FILE = "tandem_conversion.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generation_config(gguf_file: GGUFFile) -> dict[str, Any]:
    config: dict[str, Any] = {}
    bos = token_id(gguf_file, "bos")
    if bos is not None:
        config["bos_token_id"] = bos
    ends = end_token_ids(gguf_file)
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    pad = token_id(gguf_file, "padding")
    if pad is not None:
        config["pad_token_id"] = pad
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_folder(gguf_file: GGUFFile, folder: Path, dtype: str) -> None:
    torch_dtype = _DTYPES[dtype]
    config = hf_config(gguf_file)
    config["torch_dtype"] = dtype
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", generation_config(gguf_file))
    build_tokenizer(gguf_file).save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tokenizer_config(gguf_file))
    shapes = hf_shapes(gguf_file)
    write_safetensors(
        folder / "model.safetensors",
        shapes,
        hf_tensors(gguf_file, torch_dtype),
        torch_dtype,
        metadata={"format": "pt", "source": gguf_file.path.name},
    )
    stat = gguf_file.path.stat()
    _write_json(
        folder / MARKER_FILE,
        {
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_file.path),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "dtype": dtype,
        },
    )


def _move_into_place(built: Path, out_dir: Path) -> None:
    """Rename `built` to `out_dir`, replacing an older folder there without a half-state."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
        built.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(out_dir)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write `out_dir` as a Hugging Face folder (config, safetensors, tokenizer) for `gguf_path`.

    Everything that can be wrong with the file (missing, corrupt, unsupported architecture or
    quantization) raises GGUFError before anything is written.
    """
    if dtype not in _DTYPES:
        raise GGUFError(
            f"dtype {dtype!r} is not supported for conversion; use one of {', '.join(_DTYPES)}."
        )
    gguf_file = open_gguf(gguf_path)
    # Fail on what the user must change (architecture, quantization) before any work.
    check_architecture(gguf_file)
    check_quant_types(gguf_file)
    hf_config(gguf_file)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_folder(gguf_file, built, dtype)
        _move_into_place(built, out_dir)
    except ValueError as exc:
        if isinstance(exc, GGUFError):
            raise
        # A tensor whose bytes run past the end of the file surfaces only when it is read.
        raise GGUFError(
            f"{gguf_file.path} could not be converted ({exc}); the file is probably truncated "
            "or corrupt: delete it and download or convert it again."
        ) from exc
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return out_dir
