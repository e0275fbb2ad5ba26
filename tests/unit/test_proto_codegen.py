"""The committed generated code must match what `python -m protos.codegen` produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos import codegen

pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extras")


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    drifted = []
    for fresh in codegen.generate(tmp_path):
        rel = fresh.relative_to(tmp_path)
        committed = codegen.PROTO_ROOT / rel
        if not committed.exists() or committed.read_text() != fresh.read_text():
            drifted.append(str(rel))
    assert not drifted, (
        f"generated code is stale or missing: {drifted}; run `python -m protos.codegen` and "
        "commit the result (the grpcio-tools version must match the one in the test extras)")


def test_generated_grpc_module_imports_from_protos_package() -> None:
    from protos.tandem.v1 import generation_pb2, generation_pb2_grpc

    assert generation_pb2_grpc.GenerationStub is not None
    assert generation_pb2.DESCRIPTOR.name == "tandem/v1/generation.proto"
    assert "Generate" in generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name


def test_every_sampling_field_of_the_api_maps_onto_sampling_params() -> None:
    """The router hands every field a client set straight to SamplingParams (by name): a field
    added to the .proto without one there would fail requests that set it."""
    import msgspec

    from protos.messages import SamplingParams
    from protos.tandem.v1 import generation_pb2 as pb
    from router.validation import sampling_params

    api = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert api <= {f.name for f in msgspec.structs.fields(SamplingParams)}
    proto = pb.SamplingParams(temperature=0.0, stop=["x"], stop_token_ids=[5], seed=3,
                              logprobs=0, skip_special_tokens=False)
    got = sampling_params(proto)
    assert (got.temperature, got.stop, got.stop_token_ids, got.seed, got.logprobs,
            got.skip_special_tokens, got.max_tokens) == (0.0, ("x",), (5,), 3, 0, False,
                                                         SamplingParams().max_tokens)
