"""The `tandem` command line: generate, eval perplexity, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from cluster.default_model import DEFAULT_MODEL
from protos.messages import SamplingParams

# Errors that carry a message meant for the user: printed as one line, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, FileNotFoundError,
                                                 msgspec.ValidationError)


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help=f"Hugging Face folder or .gguf file (default: {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype (auto: bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, "
                        "else float32)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV cache size on CPU (default: a quarter of free RAM, at most 4 GiB)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--cache-dir", default=None,
                   help="where the default model and converted GGUF files are kept "
                        "(default: ~/.cache/tandem)")
    g.add_argument("--quantization", default=None, choices=["int8", "int4", "w4a8", "gguf"],
                   help="weight-only: int8 per channel, int4 group-wise, or gguf (keep a .gguf "
                        "model's Q4_0/Q4_1/Q8_0 blocks); GPTQ/AWQ folders need no flag")
    g.add_argument("--quant-group-size", type=int, default=None,
                   help="int4 group size: 32 (default), 64, 128 or 256")
    par = p.add_argument_group("parallelism (one Ray actor per rank; docs/parallelism.md)")
    par.add_argument("--tp", type=int, default=None,
                     help="tensor-parallel ranks per replica (default 1)")
    par.add_argument("--pp", type=int, default=None,
                     help="pipeline stages per replica (default 1)")
    par.add_argument("--pp-layers", type=_int_list, default=None,
                     help="decoder layers per stage, e.g. 3,5 (default: even split)")
    sp = p.add_argument_group("speculative decoding (worker/spec/)")
    sp.add_argument("--speculative", default=None,
                    choices=["ngram", "eagle", "draft", "pool"],
                    help="ngram: prompt lookup; eagle: a one-layer head drafting from the "
                         "target's hidden states; draft: a draft model in the engine (by "
                         "default the target's own weights in w4a8); pool: draft-model Ray "
                         "actors shared by all replicas (default: off)")
    sp.add_argument("--draft-model", default=None,
                    help="eagle: head folder (default: the one shipped for the default model; "
                         "bench/train_eagle.py trains one); draft/pool: draft model folder (a "
                         "small model sharing the target's tokenizer; default: the target "
                         "itself)")
    sp.add_argument("--draft-quantization", default=None, choices=["int8", "int4", "w4a8"],
                    help="draft/pool: the draft's weight format (default: w4a8 for the "
                         "target's own weights, as stored for a --draft-model)")
    sp.add_argument("--num-speculative-tokens", type=int, default=None,
                    help="most tokens proposed per step (default 8; adapts to acceptance)")
    sp.add_argument("--draft-replicas", type=int, default=None,
                    help="pool: number of draft actors (default 1)")
    sp.add_argument("--speculative-config", type=_json_object, default=None,
                    help='any other speculative setting as JSON, e.g. '
                         '\'{"eagle_tree_width": 3}\' (fields: worker/spec/config.py)')


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f'{{"eagle_tree_width": 3}} (got {text!r})')
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,5 "
                                         f"(got {text!r})") from None


def _make_llm(args: argparse.Namespace):
    from cluster.llm import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               kv_cache_bytes=args.kv_cache_bytes, block_size=args.block_size,
               enable_prefix_caching=not args.no_prefix_caching, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
               num_threads=args.threads, cache_dir=args.cache_dir,
               quantization=args.quantization, quant_group_size=args.quant_group_size or 32,
               tensor_parallel_size=args.tp or 1, pipeline_parallel_size=args.pp or 1,
               pipeline_layers=args.pp_layers, speculative=args.speculative,
               draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
               draft_replicas=args.draft_replicas,
               speculative_options=_speculative_options(args))


def _speculative_options(args: argparse.Namespace) -> dict | None:
    """--speculative-config with the flags that have no LLM argument of their own."""
    options = dict(args.speculative_config or {})
    if args.draft_quantization is not None:
        options["draft_quantization"] = args.draft_quantization
    return options or None


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed if args.temperature > 0 else None, max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos, stop=tuple(args.stop or ()),
        repetition_penalty=args.repetition_penalty)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        text = Path(args.prompts_file).read_text()
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    params = _sampling(args)
    if args.server:
        from cluster.client import generate_remote

        return generate_remote(args, prompts, params)
    llm = _make_llm(args)
    try:
        code = _generate_local(llm, args, prompts, params)
        if llm.config.speculative is not None:
            from cluster.speculative import speculation_summary

            print(speculation_summary(llm.config.speculative.method, llm.engine.stats()),
                  file=sys.stderr)
        return code
    finally:
        llm.shutdown()  # a parallel replica's actors (and the local Ray it started)


def _generate_local(llm, args: argparse.Namespace, prompts: list[str],
                    params: SamplingParams) -> int:
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                           use_tqdm=len(prompts) > 1)
    elif len(prompts) == 1 and not args.json:
        # One prompt to a terminal: stream it.
        for delta in llm.stream(prompts[0], params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    else:
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason,
                              "num_prompt_tokens": out.num_prompt_tokens}, ensure_ascii=False))
        else:
            print(out.text if len(prompts) == 1 else f"--- {prompt}\n{out.text}")
    return 0


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from cluster.perplexity import perplexity

    if (args.tp or 1) * (args.pp or 1) > 1:
        raise ValueError("eval perplexity runs in one process: drop --tp/--pp")
    llm = _make_llm(args)
    text = Path(args.text).read_text()
    tok = llm._need_tokenizer()
    ids = tok.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    result = perplexity(llm.engine, ids, window=args.window, stride=args.stride)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"perplexity {result.perplexity:.3f} over {result.tokens_scored} tokens "
              f"(window {result.window}, stride {result.stride}, "
              f"{result.tokens_per_s:.0f} tokens/s)")
    return 0


# `tandem serve` flags that override ServeConfig fields: dest -> path in the config.
_SERVE_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "cache_dir": ("cache_dir",),
    "replicas": ("replicas",),
    "preset": ("preset",),
    "address": ("ray_address",),
    "name": ("name",),
    "router_node": ("router_node",),
    "host": ("router", "host"),
    "port": ("router", "port"),
    "api_key": ("router", "api_keys"),
    "tls_cert": ("router", "tls_cert_path"),
    "tls_key": ("router", "tls_key_path"),
    "replica_cpus": ("replica", "num_cpus"),
    "replica_gpus": ("replica", "num_gpus"),
    "tp": ("replica", "tensor_parallel_size"),
    "pp": ("replica", "pipeline_parallel_size"),
    "pp_layers": ("replica", "pipeline_layers"),
    "dtype": ("engine", "dtype"),
    "device": ("engine", "device"),
    "max_model_len": ("engine", "max_model_len"),
    "kv_cache_bytes": ("engine", "kv_cache_bytes"),
    "block_size": ("engine", "block_size"),
    "max_num_seqs": ("engine", "max_num_seqs"),
    "max_num_batched_tokens": ("engine", "max_num_batched_tokens"),
    "threads": ("engine", "num_threads"),
    "quantization": ("engine", "quantization"),
    "quant_group_size": ("engine", "quant_group_size"),
    "seed": ("engine", "seed"),
    "speculative": ("engine", "speculative", "method"),
    "draft_model": ("engine", "speculative", "draft_model"),
    "num_speculative_tokens": ("engine", "speculative", "num_speculative_tokens"),
    "draft_replicas": ("engine", "speculative", "draft_replicas"),
    "draft_quantization": ("engine", "speculative", "draft_quantization"),
}


def serve_overrides(args: argparse.Namespace) -> dict:
    """The ServeConfig fields the user set on the command line (unset flags are None)."""
    out: dict = {}
    for dest, path in _SERVE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = list(value) if isinstance(value, list) else value
    if args.no_prefix_caching:
        out.setdefault("engine", {})["enable_prefix_caching"] = False
    if getattr(args, "speculative_config", None):
        spec = out.setdefault("engine", {}).setdefault("speculative", {})
        spec.update({k: v for k, v in args.speculative_config.items() if k not in spec})
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.serve import run_serve
    from cluster.serve_config import build_serve_config

    config = build_serve_config(args.config, serve_overrides(args))
    return run_serve(config)


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.status import run_status

    return run_status(args.address, args.name, args.json)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from cluster.plan import GPUS, KNOWN_MODELS, QUANT_BYTES

    p.add_argument("--model", required=True,
                   help=f"a folder with config.json, a .gguf, or one of {', '.join(KNOWN_MODELS)}")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--quantization", default=None, choices=list(QUANT_BYTES))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu", default="h100-80gb", choices=list(GPUS))
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--price-per-hour", type=float, default=None, help="$ per GPU-hour")
    p.add_argument("--tokens-per-s", type=float, default=None,
                   help="measured or expected output tokens/s of one replica")
    p.add_argument("--json", action="store_true")


def cmd_plan(args: argparse.Namespace) -> int:
    from cluster.plan import PlanInput, model_shape, plan, render, to_json

    name, shape = model_shape(args.model)
    inp = PlanInput(tp=args.tp, pp=args.pp, quantization=args.quantization,
                    group_size=args.group_size, dtype=args.dtype, kv_dtype=args.kv_dtype,
                    max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, gpu=args.gpu,
                    memory_utilization=args.gpu_memory_utilization,
                    price_per_hour=args.price_per_hour, tokens_per_s=args.tokens_per_s)
    result = plan(name, shape, inp)
    print(to_json(result, inp) if args.json else render(result, inp))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="LLM serving on Ray")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline (or from a server)")
    _engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="one prompt per line")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true",
                   help="one JSON object per prompt per line, in prompt order")
    g.add_argument("--server", default=None, help="HOST:PORT of a `tandem serve` to use instead")
    g.add_argument("--api-key", default=None, help="API key for --server")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    ppl = esub.add_parser("perplexity", help="sliding-window perplexity on a text file")
    _engine_args(ppl)
    ppl.add_argument("--text", required=True, help="a UTF-8 text file")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ppl.add_argument("--window", type=int, default=1024)
    ppl.add_argument("--stride", type=int, default=512)
    ppl.add_argument("--seed", type=int, default=0)
    ppl.add_argument("--json", action="store_true")
    ppl.set_defaults(func=cmd_eval_perplexity)

    s = sub.add_parser("serve", help="serve a model over gRPC on a Ray cluster")
    _engine_args(s)
    s.add_argument("--config", default=None, help="a ServeConfig YAML file (flags override it)")
    s.add_argument("--preset", choices=["latency", "throughput", "balanced"],
                   help="scheduler limits (max_num_seqs, max_num_batched_tokens) for a goal")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 50051; 0: any free one)")
    s.add_argument("--replicas", type=int, help="number of model replicas (default 1)")
    s.add_argument("--replica-cpus", type=float, help="CPUs reserved per replica (default 1)")
    s.add_argument("--replica-gpus", type=int, choices=[0, 1], help="GPUs per replica (default 0)")
    s.add_argument("--address", help="join this Ray cluster (default: start a local Ray; "
                                     "`auto` inside a cluster or a Ray job)")
    s.add_argument("--name", help="deployment name, unique per cluster (default: default)")
    s.add_argument("--router-node",
                   help="pin the router: `head`, or a custom resource its node declares")
    s.add_argument("--api-key", action="append",
                   help="accept this API key as `authorization: Bearer KEY` (repeatable)")
    s.add_argument("--tls-cert", help="PEM certificate chain; serve TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--seed", type=int)
    # Unset engine flags must not override the config file: None means "not given".
    s.set_defaults(func=cmd_serve, **{dest: None for dest in _SERVE_FLAGS},
                   no_prefix_caching=False)

    st = sub.add_parser("status", help="a deployment's replicas, nodes, load and health")
    st.add_argument("--address", default="auto",
                    help="the Ray cluster (default: auto, the one this machine belongs to)")
    st.add_argument("--name", default="default", help="the deployment's name (default: default)")
    st.add_argument("--json", action="store_true", help="the status as JSON")
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("plan", help="will a model fit a GPU layout; KV capacity; cost")
    _plan_args(pl)
    pl.set_defaults(func=cmd_plan)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
