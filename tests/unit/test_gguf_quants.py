"""Reading every supported GGUF tensor type, and the errors for files Tandem cannot use."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.gguf_utils import llama_cpp_permute, write_gguf
from worker.gguf import (
    SUPPORTED_QUANT_TYPES,
    GGUFError,
    convert_gguf,
    hf_config,
    hf_tensors,
    open_gguf,
    packed_tensors,
)

ROWS, COLS = 8, 512  # COLS: two 256-wide K-quant super-blocks per row
# Types gguf can only dequantize: byte offsets of their float16 scale fields inside one block,
# set to finite values so random blocks stay valid (random bytes there would be inf/NaN).
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
BASIC_METADATA = {
    "llama.block_count": 1,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
}
# Enough for a config.json: a one-layer model whose only tensor is ffn_up.
FULL_METADATA = {
    **BASIC_METADATA,
    "llama.embedding_length": COLS,
    "llama.feed_forward_length": ROWS,
}


def random_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(ROWS, COLS // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        scales = rng.uniform(0.001, 0.1, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(ROWS, -1)


def test_supported_types_are_those_promised() -> None:
    promised = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert promised <= SUPPORTED_QUANT_TYPES


@pytest.mark.parametrize(
    "qtype", sorted(SUPPORTED_QUANT_TYPES, key=lambda t: t.value), ids=lambda t: t.name
)
def test_dequantized_tensor_matches_gguf_reference(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(qtype.value)
    original = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype in K_QUANT_SCALES:
        stored = random_blocks(qtype, rng)  # gguf has no quantizer for K-quants
    elif qtype == Q.F32:
        stored = original
    elif qtype == Q.F16:
        stored = original.astype(np.float16)
    else:
        stored = gguf.quants.quantize(original, qtype)
    values = stored if stored.dtype == np.uint8 else stored.astype(np.float32)
    path = write_gguf(
        tmp_path / "t.gguf", "llama", BASIC_METADATA, {"blk.0.ffn_up.weight": (values, qtype)}
    )

    gguf_file = open_gguf(path)
    ((name, tensor),) = hf_tensors(gguf_file)
    reference = gguf.quants.dequantize(stored, qtype)
    assert name == "model.layers.0.mlp.up_proj.weight"
    assert tensor.shape == (ROWS, COLS) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), reference)
    assert np.isfinite(reference).all()
    if qtype not in K_QUANT_SCALES:  # quantization error stays small: the layout is not scrambled
        tolerance = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 2e-2, Q.Q8_0: 3e-2}.get(qtype, 0.5)
        np.testing.assert_allclose(
            tensor.numpy(), original, atol=tolerance * np.abs(original).max()
        )

    packed = packed_tensors(gguf_file)["model.layers.0.mlp.up_proj.weight"]
    assert packed.quant_type == qtype and packed.shape == (ROWS, COLS)
    np.testing.assert_array_equal(gguf.quants.dequantize(packed.data, qtype), reference)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_q_and_k_rows_are_unpermuted_for_llama(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(1)
    # head_dim = COLS // ... : 4 heads of 2 rows for q (ROWS=8), 2 KV heads of 4 rows for k
    q = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    k = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype in K_QUANT_SCALES:
        q_store, k_store = random_blocks(qtype, rng), random_blocks(qtype, rng)
        q, k = gguf.quants.dequantize(q_store, qtype), gguf.quants.dequantize(k_store, qtype)
        # Permuting the dequantized rows equals dequantizing permuted block rows.
        q_store = llama_cpp_permute(q_store, 4)
        k_store = llama_cpp_permute(k_store, 2)
    else:
        q_store, k_store = llama_cpp_permute(q, 4), llama_cpp_permute(k, 2)
    tensors = {"blk.0.attn_q.weight": (q_store, qtype), "blk.0.attn_k.weight": (k_store, qtype)}
    gguf_file = open_gguf(write_gguf(tmp_path / "t.gguf", "llama", BASIC_METADATA, tensors))
    loaded = dict(hf_tensors(gguf_file))
    tolerance = 0 if qtype in (Q.F32, Q.Q4_K) else 0.05
    np.testing.assert_allclose(
        loaded["model.layers.0.self_attn.q_proj.weight"].numpy(), q, atol=tolerance
    )
    np.testing.assert_allclose(
        loaded["model.layers.0.self_attn.k_proj.weight"].numpy(), k, atol=tolerance
    )
    packed = packed_tensors(gguf_file)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        np.testing.assert_array_equal(
            gguf.quants.dequantize(packed[name].data, qtype), loaded[name].numpy()
        )


def test_unsupported_quant_type_is_named(tmp_path: Path) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    blocks = np.zeros((ROWS, COLS // block_size * type_size), dtype=np.uint8)
    path = write_gguf(
        tmp_path / "t.gguf", "llama", BASIC_METADATA, {"blk.0.ffn_up.weight": (blocks, Q.IQ2_XXS)}
    )
    with pytest.raises(GGUFError, match=r"IQ2_XXS.*supported types are .*Q4_K") as raised:
        list(hf_tensors(open_gguf(path)))
    assert "blk.0.ffn_up.weight" in str(raised.value)
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    values = np.ones((ROWS, COLS), dtype=np.float32)
    path = write_gguf(
        tmp_path / "t.gguf",
        "gpt2",
        {"gpt2.block_count": 1},
        {"blk.0.ffn_up.weight": (values, Q.F32)},
    )
    with pytest.raises(GGUFError, match=r"'gpt2' is not supported.*llama, mistral, qwen2"):
        hf_config(open_gguf(path))
    with pytest.raises(GGUFError, match="gpt2"):
        convert_gguf(path, tmp_path / "out")


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_garbage_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        open_gguf(path)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.98])
def test_truncated_file_is_rejected(tmp_path: Path, keep: float) -> None:
    values = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    path = write_gguf(
        tmp_path / "t.gguf", "llama", FULL_METADATA, {"blk.0.ffn_up.weight": (values, Q.F32)}
    )
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="corrupt"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [path], "no temporary folder may be left behind"
