"""`tandem generate --server HOST:PORT`: the same output as offline mode, from a `tandem serve`.

A plain gRPC client of tandem.v1.Generation: several prompts run concurrently, one prompt to a
terminal streams as it arrives, and a failed call prints one line naming the status code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

import grpc

from protos.messages import SamplingParams
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}


def sampling_proto(params: SamplingParams) -> pb.SamplingParams:
    out = pb.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        min_tokens=params.min_tokens, stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens)
    if params.seed is not None:
        out.seed = params.seed
    if params.max_tokens is not None:
        out.max_tokens = params.max_tokens
    if params.logprobs is not None:
        out.logprobs = params.logprobs
    return out


def generate_request(prompt: str | list[int], params: SamplingParams, *,
                     chat: bool = False) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=sampling_proto(params))
    if isinstance(prompt, list):
        request.token_ids.ids.extend(prompt)
    elif chat:
        request.chat.messages.append(pb.ChatMessage(role="user", content=prompt))
    else:
        request.text = prompt
    return request


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Completion:
    """One prompt's answer, assembled from its stream."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.num_prompt_tokens = 0

    def add(self, response: pb.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids.extend(response.token_ids)
        if response.finish_reason:
            self.finish_reason = FINISH_REASONS[response.finish_reason]
        if response.HasField("usage"):
            self.num_prompt_tokens = response.usage.prompt_tokens


async def _complete(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest,
                    md: tuple[tuple[str, str], ...], stream_to: TextIO | None) -> Completion:
    done = Completion()
    async for response in stub.Generate(request, metadata=md):
        done.add(response)
        if stream_to is not None and response.text:
            stream_to.write(response.text)
            stream_to.flush()
    return done


async def _run(target: str, prompts: list[str], params: SamplingParams, *, chat: bool,
               as_json: bool, api_key: str | None, out: TextIO) -> None:
    md = metadata(api_key)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        if len(prompts) == 1 and not as_json:
            await _complete(stub, generate_request(prompts[0], params, chat=chat), md, out)
            out.write("\n")
            return
        results = await asyncio.gather(
            *(_complete(stub, generate_request(p, params, chat=chat), md, None)
              for p in prompts))
    for prompt, done in zip(prompts, results):
        if as_json:
            print(json.dumps({"prompt": prompt, "text": done.text, "token_ids": done.token_ids,
                              "finish_reason": done.finish_reason,
                              "num_prompt_tokens": done.num_prompt_tokens},
                             ensure_ascii=False), file=out)
        else:
            print(done.text if len(prompts) == 1 else f"--- {prompt}\n{done.text}", file=out)


def generate_remote(args: argparse.Namespace, prompts: list[str], params: SamplingParams,
                    out: Any = None) -> int:
    """Runs the prompts on the server at args.server; prints like offline `tandem generate`."""
    out = out or sys.stdout
    try:
        asyncio.run(_run(args.server, prompts, params, chat=args.chat, as_json=args.json,
                         api_key=args.api_key, out=out))
    except grpc.aio.AioRpcError as exc:
        out.flush()
        print(f"tandem: error: {args.server}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    return 0
