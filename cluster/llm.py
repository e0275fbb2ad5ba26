"""Offline API: `LLM(model).generate(prompts)` and `.chat(messages)` on one in-process engine,
or, with tensor_parallel_size * pipeline_parallel_size > 1, on a parallel replica of Ray actors
(a local Ray is started unless one is already connected)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cluster.default_model import resolve_model
from cluster.speculative import speculative_config, start_pool
from protos.messages import OutputDelta, Request, RequestOutput, SamplingParams
from text.detokenizer import IncrementalDetokenizer
from text.tokenizer import Tokenizer
from worker.config import EngineConfig
from worker.engine import Engine

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        seed: int = 0,
        num_threads: int | None = None,
        cache_dir: str | Path | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        pipeline_layers: list[int] | None = None,
        quantization: str | None = None,
        quant_group_size: int = 32,
        speculative: str | None = None,
        draft_model: str | None = None,
        num_speculative_tokens: int | None = None,
        draft_replicas: int | None = None,
        speculative_options: dict[str, Any] | None = None,
    ) -> None:
        """`speculative`: "ngram", "eagle" (a head drafting from the target's hidden states),
        "draft" (in-process draft model; without `draft_model` the target's own weights in
        w4a8 over its KV cache) or "pool" (draft-model Ray actors; a local Ray is started
        unless one is connected); see worker/spec/.
        `speculative_options`: any other SpeculativeConfig field, e.g.
        {"eagle_tree_width": 1} (worker/spec/config.py)."""
        self.model_dir = resolve_model(model, Path(cache_dir) if cache_dir else None)
        self.config = EngineConfig(
            model=str(self.model_dir), dtype=dtype, device=device, max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, seed=seed, num_threads=num_threads,
            quantization=quantization, quant_group_size=quant_group_size,
            speculative=speculative_config(speculative, draft_model=draft_model,
                                           num_speculative_tokens=num_speculative_tokens,
                                           draft_replicas=draft_replicas,
                                           options=speculative_options))
        self.tokenizer: Tokenizer | None = None
        if (self.model_dir / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_dir(self.model_dir)
        world = tensor_parallel_size * pipeline_parallel_size
        if world > 1 and speculative == "pool":
            # The replica's rank 0 finds a pool by name, which only `tandem serve` sets up.
            raise ValueError("speculative='pool' with tensor/pipeline parallelism runs under "
                             "`tandem serve`; in LLM use 'ngram' or 'draft' with it")
        if world > 1 and speculative == "eagle":
            raise ValueError("speculative='eagle' reads the target's hidden states in one "
                             "process: it needs tensor_parallel_size=1 and "
                             "pipeline_parallel_size=1; use 'ngram' with parallelism")
        if world > 1:
            self.engine: Any = _parallel_engine(self.config, self.model_dir, tensor_parallel_size,
                                                pipeline_parallel_size, pipeline_layers)
        else:
            self.draft_actors = start_pool(self.config) if speculative == "pool" else None
            self.engine = Engine(self.config, self.model_dir, self.tokenizer,
                                 IncrementalDetokenizer if self.tokenizer else None,
                                 draft_actors=self.draft_actors)

    def shutdown(self) -> None:
        """Stops a parallel replica's actors (and the local Ray it started); no-op otherwise."""
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

    # -- inputs --------------------------------------------------------------------------------

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer

    def _to_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        return list(prompt)

    @staticmethod
    def _normalize(prompts: str | Sequence[Any]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self._need_tokenizer().apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt)

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[Any],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        items = self._normalize(prompts)
        texts = [p if isinstance(p, str) else None for p in items]
        return self._run([self._to_ids(p) for p in items], texts, sampling, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        rendered = [self.render_chat(list(c)) for c in conversations]
        tok = self._need_tokenizer()
        # The template already carries the special tokens (as transformers' apply_chat_template).
        ids = [tok.encode(r, add_special_tokens=False) for r in rendered]
        return self._run(ids, rendered, sampling, use_tqdm)

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Iterator[OutputDelta]:
        """Deltas of one request as the engine produces them."""
        rid = uuid.uuid4().hex
        self.engine.add_request(Request(request_id=rid, prompt_token_ids=self._to_ids(prompt),
                                        sampling=sampling or SamplingParams()))
        done = False
        while not done:
            for d in self.engine.step():
                if d.request_id == rid:
                    yield d
                    done = d.finished

    def _run(self, ids: list[list[int]], texts: list[str | None],
             sampling: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        if sampling is None or isinstance(sampling, SamplingParams):
            params = [sampling or SamplingParams()] * len(ids)
        else:
            params = list(sampling)
            if len(params) != len(ids):
                raise ValueError(f"got {len(params)} SamplingParams for {len(ids)} prompts")
        rids = [uuid.uuid4().hex for _ in ids]
        outputs = {
            rid: RequestOutput(request_id=rid, prompt=text, prompt_token_ids=p, text="",
                               token_ids=[], finish_reason=None)
            for rid, p, text in zip(rids, ids, texts)
        }
        # Validate everything before anything runs, so a bad prompt fails the call cleanly.
        for rid, p, sp in zip(rids, ids, params):
            self.engine.validate(Request(request_id=rid, prompt_token_ids=p, sampling=sp))
        for rid, p, sp in zip(rids, ids, params):
            self.engine.add_request(Request(request_id=rid, prompt_token_ids=p, sampling=sp))
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", file=sys.stderr)
        try:
            while self.engine.has_unfinished():
                for d in self.engine.step():
                    out = outputs.get(d.request_id)
                    if out is None:
                        continue
                    out.token_ids.extend(d.token_ids)
                    out.text += d.text
                    if d.logprobs:
                        out.logprobs = (out.logprobs or []) + d.logprobs
                    if d.finished:
                        out.finish_reason = d.finish_reason
                        out.stop_reason = d.stop_reason
                        out.num_cached_tokens = d.num_cached_tokens
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort(rids)
            self.engine.step()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [outputs[r] for r in rids]


def _parallel_engine(config: EngineConfig, model_dir: Path, tp: int, pp: int,
                     pipeline_layers: list[int] | None) -> Any:
    import os

    import msgspec

    from cluster.remote_engine import RemoteEngine
    from cluster.serve_config import ReplicaSettings
    from worker.model_runner import resolve_device

    on_gpu = resolve_device(config.device).type == "cuda"
    if config.num_threads is None and not on_gpu:
        # Ranks share this machine's cores instead of each taking all of them.
        config = msgspec.structs.replace(
            config, num_threads=max(1, (os.cpu_count() or 1) // (tp * pp)))
    replica = ReplicaSettings(num_cpus=1.0, num_gpus=1 if on_gpu else 0,
                              tensor_parallel_size=tp, pipeline_parallel_size=pp,
                              pipeline_layers=pipeline_layers)
    return RemoteEngine(config, replica, model_dir.name)
