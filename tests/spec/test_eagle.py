"""EAGLE speculation: the head's cached path equals its training path, the proposer feeds it the
target's true features at the right positions, and outputs stay exactly greedy."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
import torch

from protos.messages import Request
from tests.engine_utils import greedy, run_to_completion, tokens_of
from worker.config import ConfigError, EngineConfig
from worker.engine import Engine
from worker.spec.config import SpeculativeConfig
from worker.spec.eagle_fused import FusedEagleLayer
from worker.spec.eagle_head import (
    EagleHead,
    EagleHeadConfig,
    TorchEagleLayer,
    load_eagle_head,
    save_eagle_head,
    shipped_head,
)
from worker.spec.eagle_proposer import EagleProposer

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7],
    list(range(20, 45)),
    [9, 3, 9, 3, 9, 3, 11],
    [100, 101, 102],
]


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir("llama-gqa")


def head_config(model: Path, vocab: tuple[int, ...] | None = None) -> EagleHeadConfig:
    c = json.loads((model / "config.json").read_text())
    return EagleHeadConfig(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=10000.0, vocab=vocab or tuple(range(c["vocab_size"])))


def identity_head(cfg: EagleHeadConfig) -> EagleHead:
    """A head whose feature guess is the (renormalised) feature it was given: it proposes the
    token the target chose last, again and again, which the tiny random target often repeats,
    so proposals get accepted, partly accepted and rejected."""
    head = EagleHead(cfg)
    d = cfg.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, d:] = torch.eye(d)
        head.o_proj.weight.zero_()
        head.down.weight.zero_()
    return head


def layers_head(cfg: EagleHeadConfig) -> EagleHead:
    """The identity head, reading the stream entering layer 1 too (EAGLE-3): its feature is
    a random mix of that stream and the final feature, so drafts depend on both."""
    head = identity_head(msgspec.structs.replace(cfg, feature_layers=(1,)))
    with torch.no_grad():
        head.feature_proj.weight[:, :cfg.hidden_size].normal_(0, 0.1)
        head.stream_norm.uniform_(0.5, 1.5)
    return head


@pytest.fixture(scope="module")
def heads(model, tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    cfg = head_config(model)
    out = {}
    for name, head in (("identity", identity_head(cfg)), ("random", EagleHead(cfg)),
                       ("layers", layers_head(cfg))):
        out[name] = tmp_path_factory.mktemp(name)
        save_eagle_head(head, out[name], {"made_by": "test"})
    return out


def make_engine(model: Path, spec: SpeculativeConfig | None, **kw) -> Engine:
    cfg = dict(model=str(model), dtype="float32", kv_cache_bytes=1 << 22, block_size=4,
               speculative=spec)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def eagle(head: Path, **kw) -> SpeculativeConfig:
    """The head alone unless a test asks for the n-gram lookup beside it; no step budget and no
    measured gate (a head as big as the tiny target's layers never pays), so that every
    sequence of the batch drafts up to k tokens every step."""
    return SpeculativeConfig(method="eagle", draft_model=str(head),
                             **{"eagle_ngram_min_tokens": 0, "max_step_tokens": 1 << 10,
                                "measure_gate": False, **kw})


def run(engine: Engine, max_tokens: int = 24, tag: str = "r") -> list[list[int]]:
    reqs = [Request(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=greedy(max_tokens))
            for i, p in enumerate(PROMPTS)]
    out = run_to_completion(engine, reqs)
    return [tokens_of(out[r.request_id]) for r in reqs]


@pytest.fixture(scope="module")
def baseline(model) -> list[list[int]]:
    return run(make_engine(model, None))


def test_cached_rows_equal_the_training_pass(model):
    """Drafting appends rows to a KV cache a few at a time, with fused q/k/v weights; training
    runs whole sequences under a causal mask. Both must compute the same features and keys."""
    torch.manual_seed(1)
    head = EagleHead(head_config(model)).eval()
    head.attach_target(torch.randn(256, 64), torch.randn(256, 64))
    n = 11
    ids, feats, pos = torch.randint(0, 256, (n,)), torch.randn(n, 64), torch.arange(n)
    with torch.inference_mode():
        g_ref, k_ref, v_ref = head.layer(ids[None], feats[None], pos)
        head.fuse_for_drafting()  # drafting runs one q/k/v matmul
        empty = torch.zeros(2, 0, 16)
        cache, outs = (empty, empty), []
        for a, b in ((0, 4), (4, 5), (5, 8), (8, 11)):
            g, k, v = head.layer(ids[a:b], feats[a:b], pos[a:b], cache=cache)
            cache = (torch.cat((cache[0], k), 1), torch.cat((cache[1], v), 1))
            outs.append(g)
    torch.testing.assert_close(torch.cat(outs), g_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[0], k_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[1], v_ref[0], atol=1e-5, rtol=1e-5)


def test_offline_sampled_acceptance_at_temperature_zero_is_the_first_token_accuracy(model):
    """bench.eval_eagle --temperatures: at T = 0 a point mass is accepted exactly where it is
    the target's greedy token (and a draw from q is that point mass); two siblings are
    accepted at least as often as one, and every chance lies in [0, 1]."""
    from bench.train_eagle import first_token_accuracy, sampled_acceptance

    torch.manual_seed(3)
    head = EagleHead(head_config(model)).eval()
    lm_head = torch.randn(256, 64)
    head.attach_target(torch.randn(256, 64), lm_head)
    item = (torch.randint(0, 256, (40,)), torch.randn(40, 64), 5)
    chances = sampled_acceptance(head, item, lm_head, [0.0, 0.5, 1.0])
    one, two, drawn = chances[0.0]
    assert one == pytest.approx(first_token_accuracy(head, [item])) and drawn == one
    for t in (0.5, 1.0):
        one, two, drawn = chances[t]
        assert 0 < one <= two <= 1 and 0 < drawn <= 1


def test_offline_calibration_pairs_each_draft_token_with_the_answers_next_token(model):
    """bench.eval_eagle's calibration: per answer position, the head's three likeliest first
    draft tokens, best first, with their probabilities, right exactly where the answer has that
    token next. The answer here takes the head's rank-(n % 4) token at position n (rank 3: a
    token the head does not rank)."""
    from bench.train_eagle import _shift, calibration

    torch.manual_seed(4)
    head = EagleHead(head_config(model)).eval()
    head.attach_target(torch.randn(256, 64), torch.randn(256, 64))
    h, start, n = torch.randn(30, 64), 5, 30
    ids = torch.randint(0, 256, (n,))
    with torch.inference_mode():
        for pos in range(start, n - 1):
            g, _, _ = head.layer(ids[None], _shift(h[None]), torch.arange(n))
            order = head.logits(g[0, pos]).argsort(descending=True)
            ids[pos + 1] = head.cfg.vocab[int(order[pos % 4])]
    pairs = calibration(head, (ids, h, start))
    assert len(pairs) == 3 * (n - 1 - start)
    for j, pos in enumerate(range(start, n - 1)):
        mine = pairs[3 * j:3 * j + 3]
        assert [hit for _, hit in mine] == [pos % 4 == r for r in range(3)]
        assert 1 >= mine[0][0] >= mine[1][0] >= mine[2][0] > 0


def test_a_context_pass_trains_what_the_second_draft_token_computes(model):
    """Training's second pass with `context` (--true-context): row i attends to the first
    pass's rows before i and to itself, which is what a second draft token computes at run
    time over a cache of rows from the target's features."""
    torch.manual_seed(2)
    head = EagleHead(head_config(model)).eval()
    head.attach_target(torch.randn(256, 64), torch.randn(256, 64))
    ids, pos = torch.randint(0, 256, (2, 9)), torch.arange(9)
    true, guessed = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    with torch.inference_mode():
        _, k1, v1 = head.layer(ids, true, pos)
        g2, _, _ = head.layer(ids, guessed, pos, context=(k1, v1))
        plain, _, _ = head.layer(ids, guessed, pos)
        for b in range(2):
            for i in range(9):
                g, _, _ = head.layer(ids[b, i:i + 1], guessed[b, i:i + 1], pos[i:i + 1],
                                     cache=(k1[b, :, :i], v1[b, :, :i]))
                torch.testing.assert_close(g[0], g2[b, i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[:, 1:], g2[:, 1:], atol=1e-3)  # the context matters


@pytest.mark.parametrize(("kind", "width"), [("identity", 1), ("random", 1), ("identity", 3),
                                             ("random", 2), ("layers", 2)])
def test_eagle_is_exact(model, heads, baseline, kind, width):
    eng = make_engine(model, eagle(heads[kind], min_acceptance=0.0, eagle_min_confidence=0.0,
                                   eagle_tree_width=width, eagle_tree_min_prob=0.0,
                                   eagle_tree_keep_prob=0.0))
    paths = []
    accept = eng.spec.proposer.on_tree_accept
    eng.spec.proposer.on_tree_accept = lambda seq, path: (paths.append(path), accept(seq, path))
    assert run(eng) == baseline
    m = eng.spec.metrics
    assert m.proposed_tokens > 0
    assert bool(paths) == (width > 1)  # trees were drafted and walked
    if kind != "random":  # acceptance, partial acceptance and rejection all happened
        assert 0 < m.accepted_tokens < m.proposed_tokens
    if width > 1 and kind != "random":  # branches other than the first were accepted
        assert any(p != list(range(len(p))) for p in paths)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert not eng.spec.proposer._states  # freed with their sequences
    fused = eng.spec.proposer.layer
    if isinstance(fused, FusedEagleLayer):  # every page of the head's pool is back
        assert len(fused.free_blocks) == fused.k_cache.shape[0]


def test_ngram_lookup_beside_the_head_is_exact(model, heads, baseline):
    """With the lookup on, copies go to the lookup and the rest to the head; the head's cache
    must still catch up over the positions the lookup covered."""
    eng = make_engine(model, eagle(heads["random"], min_acceptance=0.0, eagle_min_confidence=0.0,
                                   eagle_ngram_min_tokens=2))
    assert run(eng) == baseline
    used = eng.spec.proposer.proposals
    assert used["ngram"] > 0 and used["head"] > 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_eagle_exact_with_prefix_hits_and_preemption(model, heads, baseline):
    spec = eagle(heads["identity"], num_speculative_tokens=4, min_acceptance=0.0,
                 eagle_min_confidence=0.0)
    eng = make_engine(model, spec)
    assert run(eng, tag="a") == baseline
    assert run(eng, tag="b") == baseline  # the prompts come from the prefix cache
    assert eng.stats().prefix_hits_total > 0
    small = make_engine(model, spec, kv_cache_bytes=24 * 2 * 2 * 4 * 2 * 16 * 4)
    assert run(small) == baseline
    assert small.scheduler.num_preemptions > 0
    assert small.kv.num_free_blocks == small.kv.num_blocks


@pytest.mark.parametrize(("kind", "width"), [("identity", 1), ("identity", 3), ("layers", 3)])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_head_sees_the_targets_features_at_the_right_positions(model, heads, backend, kind,
                                                              width):
    """After a run with accepted and rejected proposals, the head's KV cache must be what one
    pass over the committed tokens, fed the target's own hidden states, computes: through the
    fused C layer over its paged pool, and through torch ops over per-sequence tensors. With
    trees, the features of the accepted branch must be the ones kept; with an EAGLE-3 head,
    the streams of its layers beside them."""
    eng = make_engine(model, eagle(heads[kind], min_acceptance=0.0,
                                   eagle_min_confidence=0.0, eagle_tree_width=width,
                                   eagle_tree_min_prob=0.0, eagle_tree_keep_prob=0.0))
    proposer = eng.spec.proposer
    fused = isinstance(proposer.layer, FusedEagleLayer)
    assert fused == FusedEagleLayer.supported(proposer.head)
    if backend == "fused" and not fused:
        pytest.skip("the fused decode layer is not built here")
    if backend == "torch":
        proposer.layer = TorchEagleLayer(proposer.head)
    kept = {}
    proposer.free = lambda seq: kept.update({seq.request_id: proposer._states[seq.request_id]})
    prompt = PROMPTS[0]
    out = run_to_completion(eng, [Request(request_id="x", prompt_token_ids=prompt,
                                          sampling=greedy(20))])
    tokens = prompt + tokens_of(out["x"])
    assert eng.spec.metrics.accepted_tokens > 0
    st = kept["x"]
    # every committed position up to the last proposal (the last verify may add k + 1 more)
    assert st.rows >= len(tokens) - 1 - eng.spec.config.num_speculative_tokens
    proposer._states["x"] = st
    keys, values = proposer.head_cache("x")

    # The target's final hidden states over the committed tokens, from one plain prefill.
    ref = make_engine(model, None)
    ref.runner.keep_hidden = True
    ref.runner.hidden_layers = proposer.head.cfg.feature_layers
    run_to_completion(ref, [Request(request_id="y", prompt_token_ids=tokens,
                                    sampling=greedy(1))])
    hidden = ref.runner.last_hidden
    assert hidden is not None and hidden.shape == (len(tokens), proposer.head.feature_width)
    with torch.inference_mode():
        hidden = proposer.head.project(hidden)
    feats = torch.cat((torch.zeros_like(hidden[:1]), hidden[:-1]))
    with torch.inference_mode():
        _, k_ref, v_ref = proposer.head.layer(torch.tensor(tokens)[None], feats[None],
                                              torch.arange(len(tokens)))
    torch.testing.assert_close(keys, k_ref[0, :, :st.rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, v_ref[0, :, :st.rows], atol=1e-4, rtol=1e-4)


def test_errors_name_the_fix(model, heads, tmp_path):
    with pytest.raises(ConfigError, match=r"bench/train_eagle\.py"):
        make_engine(model, SpeculativeConfig(method="eagle"))  # nothing shipped for it
    with pytest.raises(ConfigError, match=r"eagle\.json"):
        make_engine(model, eagle(tmp_path))
    wide = EagleHead(EagleHeadConfig(**{**json.loads(
        (heads["random"] / "eagle.json").read_text())["config"], "hidden_size": 32,
        "vocab": (1, 2)}))
    save_eagle_head(wide, tmp_path / "wide")
    with pytest.raises(ConfigError, match="hidden size 32"):
        load_eagle_head(tmp_path / "wide", torch.zeros(256, 64), torch.zeros(256, 64),
                        torch.float32)
    deep = EagleHead(msgspec.structs.replace(head_config(model), feature_layers=(2,)))
    save_eagle_head(deep, tmp_path / "deep")
    with pytest.raises(ConfigError, match=r"feature layers \[2\]: give layers of 1\.\.1.*"
                                          r"bench/train_eagle\.py"):
        make_engine(model, eagle(tmp_path / "deep"))


@pytest.mark.parametrize("prompt_len", [5, 11])
def test_stream_tap_reads_what_the_training_teacher_reads(tiny_model_dir, prompt_len):
    """The runner's rows (streams entering the tapped layers, then the final feature) must be
    what bench/train_eagle.py's teacher trains on: transformers on the same weights. Short
    prompts and decode steps run through the fused layers, cut at the tapped layers; the
    longer prompt's prefill through torch's. Tapping must not change what is generated."""
    from bench.train_eagle import teacher

    kv4 = tiny_model_dir("llama-kv4")  # 4 layers
    prompt = list(range(30, 30 + prompt_len))
    plain = run_to_completion(make_engine(kv4, None), [Request(
        request_id="p", prompt_token_ids=prompt, sampling=greedy(6))])
    eng = make_engine(kv4, None)
    eng.runner.keep_hidden, eng.runner.hidden_layers = True, (1, 3)
    rows, execute = [], eng.runner.execute

    def keep(plan):
        out = execute(plan)
        rows.append(eng.runner.last_hidden.clone())
        return out

    eng.runner.execute = keep
    out = run_to_completion(eng, [Request(request_id="t", prompt_token_ids=prompt,
                                          sampling=greedy(6))])
    assert tokens_of(out["t"]) == tokens_of(plain["p"])
    ids = prompt + tokens_of(out["t"])[:-1]  # the last token is never fed
    got = torch.cat(rows)
    assert got.shape == (len(ids), 3 * 64)

    import transformers as tf

    hf = tf.LlamaForCausalLM.from_pretrained(kv4, dtype=torch.float32).eval()
    [(_, want)] = teacher(hf, [ids], layers=(1, 3))
    # the teacher keeps bf16: compare at its precision
    torch.testing.assert_close(got.to(torch.bfloat16), want, atol=2e-2, rtol=2e-2)
    assert not torch.equal(got[:, :64], got[:, 64:128])  # two different streams


def test_an_eagle3_head_starts_from_the_final_feature(model):
    """A head that grows feature layers (bench/train_eagle.py --resume --feature-layers) must
    draft as before until training moves it: its projection starts as the final feature."""
    torch.manual_seed(3)
    head = EagleHead(msgspec.structs.replace(head_config(model), feature_layers=(1,)))
    rows = torch.randn(5, 2 * 64) * 3
    torch.testing.assert_close(head.project(rows), rows[:, 64:])
    assert head.feature_width == 128


def test_shipped_head_matches_the_default_models_folders(tmp_path):
    from cluster.default_model import DEFAULT_MODEL

    found = shipped_head(tmp_path / DEFAULT_MODEL)
    assert found is not None and (found / "eagle.safetensors").is_file()
    assert shipped_head(tmp_path / f"{DEFAULT_MODEL}-bfloat16") == found
    assert shipped_head(tmp_path / "some-other-model") is None
    cfg = json.loads((found / "eagle.json").read_text())
    assert cfg["config"]["hidden_size"] == 576 and len(cfg["config"]["vocab"]) > 1000


def test_llm_refuses_eagle_with_parallelism(model):
    from cluster.llm import LLM

    with pytest.raises(ValueError, match="eagle"):
        LLM(str(model), tensor_parallel_size=2, speculative="eagle")


def test_serve_config_refuses_eagle_with_parallelism():
    from cluster.serve_config import build_serve_config

    with pytest.raises(ConfigError, match="eagle"):
        build_serve_config(overrides={"engine": {"speculative": {"method": "eagle"}},
                                      "replica": {"tensor_parallel_size": 2}})
    ok = build_serve_config(overrides={"engine": {"speculative": {"method": "eagle"}}})
    assert ok.engine.speculative.method == "eagle"


@pytest.mark.parametrize("width", [1, 2])
def test_sampled_requests_verify_eagle_proposals(model, heads, width):
    """At temperature > 0 a proposal is a point mass the rejection sampler can verify (a tree
    with width 2, walked by worker/spec/tree.py: walk_sampled); the run must finish with every
    token in range and every KV block back."""
    from protos.messages import SamplingParams

    eng = make_engine(model, eagle(heads["identity"], min_acceptance=0.0,
                                   eagle_min_confidence=0.0, eagle_tree_width=width,
                                   eagle_tree_min_prob=0.0, eagle_tree_keep_prob=0.0))
    walked: list[list[int]] = []
    on_tree_accept = eng.spec.proposer.on_tree_accept
    eng.spec.proposer.on_tree_accept = lambda s, path: (walked.append(path),
                                                        on_tree_accept(s, path))
    reqs = [Request(request_id=f"s{i}", prompt_token_ids=p,
                    sampling=SamplingParams(temperature=0.7, max_tokens=16, ignore_eos=True,
                                            seed=i, repetition_penalty=1.1))
            for i, p in enumerate(PROMPTS)]
    out = run_to_completion(eng, reqs)
    assert all(len(tokens_of(out[r.request_id])) == 16 for r in reqs)
    assert all(0 <= t < 256 for r in reqs for t in tokens_of(out[r.request_id]))
    assert eng.spec.metrics.proposed_tokens > 0
    assert (len(walked) > 0) == (width > 1)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_llm_and_cli_reach_the_eagle_proposer(model, heads):
    from cluster.cli import build_parser
    from cluster.llm import LLM
    from cluster.speculative import speculative_config
    from protos.messages import SamplingParams

    args = build_parser().parse_args(["generate", "--prompt", "x", "--speculative", "eagle",
                                      "--draft-model", str(heads["identity"])])
    spec = speculative_config(args.speculative, draft_model=args.draft_model)
    assert (spec.method, spec.draft_model) == ("eagle", str(heads["identity"]))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_bytes=1 << 22, block_size=4)
    plain = [o.token_ids for o in LLM(str(model), **kw).generate(PROMPTS, params)]
    llm = LLM(str(model), speculative="eagle", draft_model=str(heads["identity"]), **kw)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
    assert llm.engine.stats().spec_proposed_tokens_total > 0


@pytest.mark.gpu
def test_eagle_is_exact_on_cuda(model, heads):
    """On CUDA the head runs in torch ops (the fused layer is CPU-only) with its positions,
    tokens and vocabulary map on the GPU."""
    eng = make_engine(model, eagle(heads["identity"], min_acceptance=0.0,
                                   eagle_min_confidence=0.0), device="cuda")
    assert isinstance(eng.spec.proposer.layer, TorchEagleLayer)
    assert run(eng) == run(make_engine(model, None, device="cuda"))
    assert eng.spec.metrics.accepted_tokens > 0


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_tree_nodes_read_their_own_branch_only(model, heads, backend):
    """Each node of a drafted tree is among the head's likeliest tokens after its own branch,
    replayed alone as a chain: the head's attention over its scratch rows is masked to the
    node's ancestors (siblings and cousins drafted in the same calls are invisible)."""

    from worker.spec.eagle_head import top_tokens
    from worker.spec.eagle_proposer import Guess, _EagleState, _Tree

    width = 3
    eng = make_engine(model, eagle(heads["random"], eagle_tree_width=width,
                                   eagle_tree_min_prob=0.0, eagle_tree_keep_prob=0.0))
    prop = eng.spec.proposer
    if backend == "torch":
        prop.layer = TorchEagleLayer(prop.head)
    elif not isinstance(prop.layer, FusedEagleLayer):
        pytest.skip("the fused decode layer is not built here")
    torch.manual_seed(3)
    last = torch.randn(prop.head.cfg.hidden_size)
    with torch.inference_mode():
        prop.head.head *= 6  # peakier guesses than a random head's: the tree grows deeper
        prop.head.o_proj.weight *= 30  # and attention that moves them
        if isinstance(prop.layer, FusedEagleLayer):  # its layer holds its own weight copies
            prop.layer = FusedEagleLayer(prop.head, 1 << 20, 256)
        ids, logps = top_tokens(prop.head, last[None], width)
        st = _EagleState(prop.layer.new_cache())
        assert prop.layer.reserve(st.cache, width * 12)
        draft = _Tree(prop, SimpleNamespace(num_tokens=5), st, Guess(last, ids[0], logps[0]), 12)
        prop._run([draft])
        tree = draft.proposal()
        tokens, parents = tree.token_ids, tree.parents
        assert len(tokens) == 12 and max(d for d in _depths(parents)) >= 3
        to_target = torch.tensor(prop.head.cfg.vocab)
        for i in range(len(tokens)):
            branch = [i]
            while parents[branch[-1]] >= 0:
                branch.append(parents[branch[-1]])
            branch.reverse()
            feats = [last]
            for j in range(len(branch)):
                top = to_target[prop.head.logits(feats[j]).topk(width).indices].tolist()
                assert tokens[branch[j]] in top, f"node {branch[j]} of branch {branch}"
                ids = torch.tensor([tokens[b] for b in branch[:j + 1]])
                g, _, _ = prop.head.layer(ids[None], torch.stack(feats)[None],
                                          torch.arange(5, 6 + j))
                feats.append(g[0, -1])


def _depths(parents):
    from worker.spec.tree import depths

    return depths(parents)


@pytest.mark.parametrize("width", [1, 2])
def test_a_batch_drafts_what_each_sequence_drafts_alone(model, heads, width):
    """The proposer drafts a batch in lockstep (one head call per round for all sequences);
    every step's proposals equal those of drafting each sequence alone, trees and chains."""
    recorded: dict[str, list] = {}
    for mode in ("batched", "alone"):
        # no confidence floor, so that drafts run deep
        eng = make_engine(model, eagle(heads["identity"], eagle_tree_width=width,
                                       eagle_min_confidence=0.0, eagle_tree_min_prob=0.0,
                                       eagle_tree_keep_prob=0.0))
        prop = eng.spec.proposer
        batched = prop.propose

        def propose(seqs, ks, batched=batched, mode=mode):
            if mode == "batched":
                out = batched(seqs, ks)
            else:
                out = [batched([s], [k])[0] for s, k in zip(seqs, ks)]
            recorded.setdefault(mode, []).append(
                [(p.token_ids, p.parents) for p in out])
            return out

        prop.propose = propose
        tokens = run(eng)
        recorded[mode + " tokens"] = tokens
    assert recorded["batched"] == recorded["alone"]
    assert recorded["batched tokens"] == recorded["alone tokens"]
    # the batch really drafted several sequences per call, deeper than one token
    assert max(sum(len(p[0]) > 0 for p in step) for step in recorded["batched"]) >= 3
    assert max(len(p[0]) for step in recorded["batched"] for p in step) >= 3


def test_past_batch_one_a_catch_up_runs_the_recent_positions_only(model, heads):
    """A batch's catch-up costs about one head call: a sequence's first runs its whole prompt,
    later ones the last CATCH_UP_ROWS // batch positions (the rest stay missing from the
    head's cache); a sequence drafting alone catches up on everything."""
    from worker.spec.eagle_proposer import CATCH_UP_ROWS

    prop = make_engine(model, eagle(heads["identity"])).spec.proposer
    d = prop.head.cfg.hidden_size
    seqs = [SimpleNamespace(request_id=f"s{i}", token_ids=list(range(3, 43)), num_tokens=10)
            for i in range(3)]

    def decode(seq, upto):  # the target scored positions num_tokens-1 .. upto-2
        first = seq.num_tokens - 1
        prop._state(seq).pending.append((first, torch.randn(upto - 1 - first, d)))
        seq.num_tokens = upto

    for seq in seqs:
        prop._state(seq).pending.append((0, torch.randn(10, d)))  # the prompt's prefill
    prop.propose(seqs[:2], [0, 0])  # k = 0: catch-up only
    prop.propose(seqs[2:], [0])
    assert [prop._states[s.request_id].rows for s in seqs] == [10, 10, 10]
    for seq in seqs:
        decode(seq, 40)  # 30 tokens decoded without speculation
    prop.propose(seqs[:2], [0, 0])
    prop.propose(seqs[2:], [0])
    states = [prop._states[s.request_id] for s in seqs]
    assert [st.rows for st in states] == [10 + CATCH_UP_ROWS // 2] * 2 + [40]
    assert all(st.done == 40 and st.last is not None for st in states)


class _ScriptedLayer:
    """A drafting layer whose every scored row reads the same two next tokens, draft ids 1 and
    2, with probabilities 0.5 and 0.06: a tree's node probabilities are then known."""

    max_position = 1 << 10

    def __init__(self, d: int) -> None:
        self.d, self.calls = d, 0

    def new_cache(self) -> list[int]:
        return []

    def reserve(self, cache: list[int], rows: int) -> bool:
        return True

    def draft_batch(self, requests):
        self.calls += 1
        top = [1, 2], [math.log(0.5), math.log(0.06)]
        return [(torch.zeros(len(r.tokens), self.d), [top[0]] * r.scored,
                 [top[1]] * r.scored) for r in requests]


@pytest.mark.parametrize(("keep", "want"), [
    (0.1, [0.6, 0.3, 0.15]),
    (0.03, [0.6, 0.3, 0.15, 0.075, 0.05, 0.036]),
    (0.0, [0.6, 0.3, 0.15, 0.075, 0.05, 0.036, 0.025, 0.018]),
])
def test_a_tree_verifies_the_grown_nodes_down_to_the_keep_probability(model, keep, want):
    """Growth stops where the likeliest leaf falls under tree_min_prob (0.1); of the nodes
    grown, those of at least tree_keep_prob are verified, the k
    likeliest of them. Keeping more nodes must not cost another head call."""
    from worker.spec.eagle_proposer import Guess, _Tree

    head = EagleHead(head_config(model))
    layer = _ScriptedLayer(head.cfg.hidden_size)
    prop = EagleProposer(head, layer=layer, tree_width=2, tree_min_prob=0.1,
                         tree_keep_prob=keep)
    seq = SimpleNamespace(request_id="s", num_tokens=5, token_ids=[3, 4, 5, 6, 7])
    root = Guess(torch.zeros(head.cfg.hidden_size), [1, 2], [math.log(0.6), math.log(0.05)])
    tree = _Tree(prop, seq, prop._state(seq), root, k=8)
    prop._run([tree])
    # depths: 0.6 0.05 | 0.3 0.036 (under 0.6), 0.025 0.003 | 0.15 0.018 (under 0.3),
    # 0.018 0.00216 | 0.075 0.009 (under 0.15), 0.009 0.00108; 0.075 < 0.1 ends growth
    assert layer.calls == 3
    proposal = tree.proposal()
    probs = [math.exp(tree.nodes[i].logp) for i in sorted(
        range(len(tree.nodes)), key=lambda i: (-tree.nodes[i].logp, i))][:len(want)]
    assert probs == pytest.approx(want, rel=1e-6)
    assert len(proposal.token_ids) == len(want)
    # parents come before their children, and every kept node's parent is kept
    assert all(-1 <= p < i for i, p in enumerate(proposal.parents))
    depth = [0] * len(want)
    for i, p in enumerate(proposal.parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    assert sorted(depth) == sorted({0.6: 1, 0.05: 1, 0.3: 2, 0.036: 2, 0.025: 2, 0.15: 3,
                                    0.018: 3, 0.075: 4}[w] for w in want)
