"""The op() dispatchers on a real GPU (compiled Triton) against the CPU references, at serving
sizes the interpreter is too slow for. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels import quant_matmul as qm
from kernels.kv_store import store_kv, store_kv_reference
from kernels.paged_attention import paged_attention, paged_attention_reference
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.rotary import rotary_embedding, rotary_embedding_reference
from tests.kernels.kcheck import assert_close
from tests.kernels.test_paged_attention import make_batch, to

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32)])
def test_paged_attention_serving_sizes(heads: tuple[int, int], window: int | None) -> None:
    seqs = [(4000, 1), (17, 1), (700, 300), (2048, 1), (513, 513)] + [(300, 1)] * 8
    q, kc, vc, meta, _ = make_batch(seqs, *heads, 128, 16, torch.bfloat16, window, seed=9)
    ref = paged_attention_reference(q.float(), kc.float(), vc.float(), meta, 128 ** -0.5)
    out = paged_attention(*to(CUDA, q, kc, vc, meta), 128 ** -0.5)
    assert_close(out.cpu(), ref, torch.bfloat16)


def test_small_ops() -> None:
    x, w, r = torch.randn(300, 4096).half(), torch.randn(4096).half(), torch.randn(300, 4096).half()
    out, res = rms_norm(x.to(CUDA), w.to(CUDA), 1e-6, r.to(CUDA))
    ref, ref_res = rms_norm_reference(x, w, 1e-6, r)
    assert_close(out.cpu(), ref, torch.float16)
    assert torch.equal(res.cpu(), ref_res)
    pos = torch.randint(0, 4096, (300,))
    q, k = torch.randn(300, 32, 128).half(), torch.randn(300, 8, 128).half()
    cache = torch.randn(4096, 128)
    for o, e in zip(rotary_embedding(pos.to(CUDA), q.to(CUDA), k.to(CUDA), cache.to(CUDA)),
                    rotary_embedding_reference(pos, q, k, cache), strict=True):
        assert_close(o.cpu(), e, torch.float16)
    kc, vc = torch.randn(64, 16, 8, 128).half(), torch.randn(64, 16, 8, 128).half()
    slots = torch.randperm(1024)[:300]
    slots[::7] = -1
    kd, vd = kc.to(CUDA), vc.to(CUDA)
    store_kv(k.to(CUDA), k.to(CUDA), kd, vd, slots.to(CUDA))
    store_kv_reference(k, k, kc, vc, slots)
    assert torch.equal(kd.cpu(), kc) and torch.equal(vd.cpu(), vc)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_quant_linear(m: int) -> None:
    w = torch.randn(4096, 2048).half()
    x = torch.randn(m, 2048).half()
    q8, s8 = qm.quantize_int8(w)
    assert_close(qm.int8_linear(x.to(CUDA), q8.to(CUDA), s8.to(CUDA)).cpu(),
                 qm.int8_linear_reference(x.float(), q8, s8.float()), torch.float16)
    packed, s4, z4 = qm.quantize_int4(w, 128)
    out = qm.int4_linear(x.to(CUDA), packed.to(CUDA), s4.to(CUDA), z4.to(CUDA), 128)
    assert_close(out.cpu(), qm.int4_linear_reference(x.float(), packed, s4.float(), z4.float(),
                                                     128), torch.float16)
