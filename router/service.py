"""GenerationServicer: the tandem.v1.Generation gRPC service on top of a Fleet."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import msgspec

from protos.messages import ModelCard, OutputDelta
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
from router.fleet import Fleet, NoReplicaError, StreamFailed
from router.validation import InvalidInput, Validator

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
_STREAM_CODES = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


def model_card_proto(card: ModelCard) -> pb.ModelCard:
    return pb.ModelCard(name=card.name, max_model_len=card.max_model_len,
                        vocab_size=card.vocab_size, eos_token_ids=card.eos_token_ids,
                        block_size=card.block_size)


def _logprobs_proto(delta: OutputDelta) -> list[pb.TokenLogprobs]:
    if not delta.logprobs:
        return []
    return [
        pb.TokenLogprobs(
            sampled=pb.Logprob(token_id=lp.sampled.token_id, logprob=lp.sampled.logprob,
                               rank=lp.sampled.rank),
            top=[pb.Logprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank) for t in lp.top],
        )
        for lp in delta.logprobs
    ]


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, fleet: Fleet, validator: Validator, card: ModelCard, *,
                 max_outstanding: int) -> None:
        self._fleet = fleet
        self._validator = validator
        self._card = card
        self._max_outstanding = max_outstanding
        self.draining = False

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this router is draining; retry (another router will answer)")
        await self._check_capacity(context)
        client_id = request.request_id or uuid.uuid4().hex
        try:
            req = await self._validator.generate_request(request, client_id)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._check_capacity(context)  # again: tokenizing may have yielded the loop
        if self._fleet.is_inflight(req.request_id):
            # Replicas key requests by id, so two clients that both send "1" must not collide;
            # checked right before submit, with no await in between.
            req = msgspec.structs.replace(
                req, request_id=f"{client_id}~{uuid.uuid4().hex[:12]}")
        try:
            stream = self._fleet.submit(req)
        except NoReplicaError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry shortly")

        opts = request.stream_options
        include_usage = opts.include_usage if opts.HasField("include_usage") else True
        num_output = 0
        num_cached = 0
        finished = False
        stream.set_deadline(context.time_remaining())
        try:
            while not finished:
                try:
                    deltas = await stream.next()
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"deadline exceeded after {num_output} output tokens")
                except StreamFailed as exc:
                    await context.abort(_STREAM_CODES[exc.code], exc.message)
                last = deltas[-1]
                finished = last.finished
                if last.finish_reason == "error":
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"the model replica failed this request: {last.error}")
                response = pb.GenerateResponse(request_id=client_id)
                for delta in deltas:
                    response.token_ids.extend(delta.token_ids)
                    response.logprobs.extend(_logprobs_proto(delta))
                    num_cached = max(num_cached, delta.num_cached_tokens)
                response.text = "".join(d.text for d in deltas)
                num_output += len(response.token_ids)
                if finished:
                    response.finish_reason = _FINISH_REASONS[last.finish_reason]
                    if isinstance(last.stop_reason, int):
                        response.stop_token_id = last.stop_reason
                    elif isinstance(last.stop_reason, str):
                        response.stop_string = last.stop_reason
                    if include_usage:
                        prompt = len(req.prompt_token_ids)
                        response.usage.CopyFrom(pb.Usage(
                            prompt_tokens=prompt, completion_tokens=num_output,
                            cached_tokens=min(num_cached, prompt)))
                yield response
        finally:
            stream.close()
            # Client cancelled or went away, deadline, or error: free the replica's work now.
            if not finished:
                self._fleet.abort(req.request_id)

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            ids = await self._validator.tokenize(request)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self._card.max_model_len)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_card_proto(self._card)])

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        try:
            self._validator.check_model(request.model)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ModelInfoResponse(model=model_card_proto(self._card))

    async def _check_capacity(self, context: grpc.aio.ServicerContext) -> None:
        if self._fleet.num_outstanding >= self._max_outstanding:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router already holds {self._max_outstanding} requests (max_outstanding); "
                "retry with backoff")
