"""--speculative and friends reach the engine from LLM, `tandem generate` and `tandem serve`."""

from __future__ import annotations

import pytest

from cluster.cli import build_parser, serve_overrides
from cluster.serve_config import build_serve_config
from cluster.speculative import speculative_config
from protos.messages import SamplingParams


def test_serve_flags_fill_engine_speculative():
    args = build_parser().parse_args(["serve", "--speculative", "pool", "--draft-model", "/d",
                                      "--num-speculative-tokens", "3", "--draft-replicas", "2"])
    config = build_serve_config(None, serve_overrides(args))
    spec = config.engine.speculative
    assert (spec.method, spec.draft_model, spec.num_speculative_tokens, spec.draft_replicas) == \
        ("pool", "/d", 3, 2)
    assert build_serve_config(None, serve_overrides(build_parser().parse_args(["serve"]))) \
        .engine.speculative is None


def test_generate_flags_parse():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--speculative", "ngram",
                                      "--num-speculative-tokens", "2"])
    assert args.speculative == "ngram" and args.num_speculative_tokens == 2


def test_speculative_config_flag_reaches_generate_and_serve():
    cli = ["--speculative", "eagle", "--num-speculative-tokens", "5",
           "--speculative-config", '{"eagle_tree_width": 3, "num_speculative_tokens": 9}']
    args = build_parser().parse_args(["generate", "--prompt", "x", *cli])
    spec = speculative_config(args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                              options=args.speculative_config)
    # the dedicated flag wins over the same field in the JSON
    assert (spec.method, spec.eagle_tree_width, spec.num_speculative_tokens) == ("eagle", 3, 5)
    served = build_serve_config(None, serve_overrides(build_parser().parse_args(["serve", *cli])))
    assert (served.engine.speculative.eagle_tree_width,
            served.engine.speculative.num_speculative_tokens) == (3, 5)


def test_flag_errors_are_clear():
    with pytest.raises(ValueError, match="need --speculative"):
        speculative_config(None, options={"eagle_tree_width": 2})
    with pytest.raises(ValueError, match=r"the fields are: .*eagle_tree_width"):
        speculative_config("eagle", options={"eagle_tree_wdith": 2})
    with pytest.raises(ValueError, match="eagle_tree_width must be in"):
        speculative_config("eagle", options={"eagle_tree_width": 0})
    with pytest.raises(SystemExit):  # argparse: not a JSON object
        build_parser().parse_args(["generate", "--prompt", "x", "--speculative-config", "[1]"])
    with pytest.raises(ValueError, match="need --speculative"):
        speculative_config(None, draft_model="/d")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        speculative_config("ngram", num_speculative_tokens=0)


def test_llm_with_ngram_matches_plain(tiny_model_dir):
    from cluster.llm import LLM

    model = str(tiny_model_dir("llama-gqa"))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 6, 7, 5, 6, 7, 5], [40, 41, 42, 43]]
    kw = dict(dtype="float32", kv_cache_bytes=1 << 22, block_size=4)
    plain = [o.token_ids for o in LLM(model, **kw).generate(prompts, params)]
    llm = LLM(model, speculative="ngram", num_speculative_tokens=3, **kw)
    assert [o.token_ids for o in llm.generate(prompts, params)] == plain


def test_llm_refuses_a_draft_pool_with_parallelism(tiny_model_dir):
    from cluster.llm import LLM

    with pytest.raises(ValueError, match="tandem serve"):
        LLM(str(tiny_model_dir("llama-gqa")), tensor_parallel_size=2, speculative="pool",
            draft_model=str(tiny_model_dir("llama-gqa")))


def test_speculation_summary_reads_the_counters():
    from cluster.speculative import speculation_summary
    from protos.messages import ReplicaStats

    stats = ReplicaStats(spec_proposed_tokens_total=40, spec_accepted_tokens_total=10,
                         spec_verifications_total=8, spec_emitted_tokens_total=18,
                         spec_proposer_seconds_total=0.012, spec_gated_steps_total=3)
    assert speculation_summary("eagle", stats) == (
        "speculative decoding (eagle): 8 verifications, 2.25 tokens each; 10 of 40 proposed "
        "tokens accepted (25%); proposer 1.50 ms per verification; 3 steps ran plain (the "
        "measured gate)")
    assert speculation_summary("ngram", ReplicaStats()) == \
        "speculative decoding (ngram): no step verified a proposal"


@pytest.mark.parametrize("speculative", [True, False])
def test_generate_prints_how_speculation_went(tiny_model_dir, monkeypatch, capsys, speculative):
    """`tandem generate --speculative` ends with the engine's own counters on stderr; without
    speculation stderr stays quiet."""
    import json

    import cluster.cli as cli
    from cluster.llm import LLM
    from cluster.speculative import speculation_summary

    made = []

    def make_llm(args):
        made.append(LLM(str(tiny_model_dir("llama-gqa")), dtype="float32",
                        kv_cache_bytes=1 << 22, block_size=4,
                        speculative="ngram" if speculative else None,
                        num_speculative_tokens=3 if speculative else None,
                        speculative_options={"measure_gate": False} if speculative else None))
        return made[0]

    # the tiny model has no tokenizer: its prompt goes in as token ids
    monkeypatch.setattr(cli, "_make_llm", make_llm)
    monkeypatch.setattr(cli, "_read_prompts", lambda args: [[5, 6, 7, 5, 6, 7, 5, 6]])
    argv = ["generate", "--prompt", "x", "--json", "--max-tokens", "24", "--ignore-eos"]
    assert cli.cmd_generate(build_parser().parse_args(argv)) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["token_ids"]) == 24
    if not speculative:
        assert "speculative" not in err
        return
    stats = made[0].engine.stats()
    assert stats.spec_verifications_total > 0
    assert err.strip().splitlines()[-1] == speculation_summary("ngram", stats)
    assert f"{stats.spec_verifications_total} verifications" in err
