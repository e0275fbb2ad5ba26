"""Helpers for driving an Engine to completion in tests."""

from __future__ import annotations

from protos.messages import OutputDelta, Request, SamplingParams


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_to_completion(engine, requests: list[Request]) -> dict[str, list[OutputDelta]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[OutputDelta]] = {r.request_id: [] for r in requests}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            out[d.request_id].append(d)
    else:
        raise AssertionError("engine did not finish")
    return out


def tokens_of(deltas: list[OutputDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]
