"""The fast engine gives lm-eval's per-document results under any mask, within a bounded prefix cache."""

import random

import pytest
import torch

from cornerstone import harness
from cornerstone.engine import Engine
from cornerstone.errors import EvaluationError
from cornerstone.masking import without
from cornerstone.players import enumerate_players
from cornerstone.schedule import plan_cache, schedule

from .architectures import TABLE_NAMES, random_model, table_model
from .conftest import TINY_CONFIGS, VOCAB, tiny_model
from .tasks import toy_docs, write_task


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-tasks")
    write_task(folder, "toy_engine", toy_docs(12))
    write_task(folder, "toy_engine_acc", toy_docs(8), metrics=("acc",))
    return folder


def masks_for(model, count=4, seed=0):
    """Empty, single-sublayer, whole-block and multi-player masks."""
    sublayers, blocks = enumerate_players(model), enumerate_players(model, "block")
    rng = random.Random(seed)
    masks = [[], [sublayers[0]], [sublayers[-1]], [blocks[1]], rng.sample(sublayers, 2)]
    masks += [rng.sample(sublayers + blocks, 3) for _ in range(count)]
    return masks


def assert_engine_matches_lm_eval(model, lm, specs, masks, cache_bytes=2 << 30, pack=None):
    engine = Engine(model, lm, specs, batch_size=4, cache_bytes=cache_bytes, pack=pack)
    for mask in masks:
        with without(model, mask):
            reference = harness.run_tasks(lm, specs)
        ours = engine.task_results(mask)
        for spec in specs:
            assert ours[spec.name].per_doc == reference[spec.name].per_doc, [p.name for p in mask]
            assert ours[spec.name].score == pytest.approx(reference[spec.name].score, abs=1e-12)
    return engine


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_engine_equals_lm_eval_per_document(model_type, toy_folder, tokenizer):
    model = table_model(model_type)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = harness.load_tasks(["toy_engine", "toy_engine_acc"], include_paths=[toy_folder])
    engine = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model))
    assert engine.cache_size_bytes > 0
    # the tiny Gemma 3s have a 4-token sliding window, shorter than the requests: one mask cannot serve
    # their full and sliding layers, so they run unpacked (the multimodal one keeps it in its text config)
    assert engine.packed == (model_type not in ("gemma3_text", "gemma3"))


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # sdpa and eager attention
def test_packing_shares_contexts_and_unpacked_rows_agree(model_type, toy_folder, tokenizer):
    model = tiny_model(model_type)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = harness.load_tasks(["toy_engine", "toy_engine_acc"], include_paths=[toy_folder])
    plain = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model, 1), pack=False)
    packed = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model, 1), pack=True)
    assert packed.tokens < plain.tokens
    # one row per distinct context (the 8 docs of the second task repeat the first 8 of the first),
    # holding that context once, then each choice's continuation
    assert sum(batch.inputs.shape[0] for batch in packed.batches) == 12
    for mask in masks_for(model, 1):
        ours, theirs = packed.loglikelihoods(mask), plain.loglikelihoods(mask)
        assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-5)


def paired_loglikelihoods(engine, lm, spec, mask):
    """(instance, the engine's (loglikelihood, is_greedy), lm-eval's) for every request of ``spec`` under ``mask``."""
    per_document = engine.per_document(engine.loglikelihoods(mask))[spec.name]
    ours = {doc.doc_id: answers for doc, answers in zip(engine.docs[spec.name], per_document)}
    spec.task.build_all_requests(samples=spec.doc_indices, rank=0, world_size=1)
    with without(engine.model, mask):
        theirs = lm.loglikelihood(spec.task.instances, disable_tqdm=True)
    return [(instance, ours[instance.doc_id][instance.idx], answer) for instance, answer in zip(spec.task.instances, theirs)]


def assert_requests_match(engine, lm, spec, masks):
    for mask in masks:
        for _, mine, theirs in paired_loglikelihoods(engine, lm, spec, mask):
            assert mine[0] == pytest.approx(theirs[0], abs=1e-4) and mine[1] == theirs[1]


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma3"])
def test_engine_loglikelihoods_equal_lm_eval_requests(model_type, toy_folder, tokenizer):
    """Request by request, not only per document: the multimodal Gemma 3's text config holds a sliding
    window (packing would ignore it) and a logit softcap its wrapper does not apply (the engine's head
    runs the model's own code), and either mistake would change these numbers."""
    model = table_model(model_type)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    [spec] = harness.load_tasks(["toy_engine"], include_paths=[toy_folder])
    engine = Engine(model, lm, [spec], batch_size=3)
    players = enumerate_players(model)
    assert_requests_match(engine, lm, spec, ([], [players[2]]))


SHORT_CONTEXT = 8  # tokens: shorter than every toy prompt (~15 tokens), longer than every toy answer (2-3)


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-tasks")
    write_task(folder, "toy_long", toy_docs(8))
    docs = toy_docs(4)
    docs[2]["choices"][1] = "The capital of France is Paris and 2 + 3 is 5"  # 19 tokens: more than the context
    write_task(folder, "toy_too_long", docs)
    return folder


def short_context_model(model_type):
    """A tiny model of ``model_type`` whose context (what lm-eval's ``max_length`` reads) is ``SHORT_CONTEXT``."""
    config = dict(TINY_CONFIGS[model_type])
    config["n_positions" if "n_positions" in config else "max_position_embeddings"] = SHORT_CONTEXT
    return random_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **config)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # rotary and learned absolute positions
def test_requests_longer_than_the_context_are_cut_from_the_left_as_lm_eval_cuts_them(model_type, long_folder, tokenizer):
    model = short_context_model(model_type)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    assert lm.max_length == SHORT_CONTEXT
    [spec] = harness.load_tasks(["toy_long"], include_paths=[long_folder])
    for pack in (True, False):
        engine = assert_engine_matches_lm_eval(model, lm, [spec], masks_for(model, 1)[:3], pack=pack)
        assert all(len(ctx) + len(cont) > SHORT_CONTEXT + 1 for doc in engine.docs[spec.name] for ctx, cont in doc.requests)
        assert all(len(request.tokens) == SHORT_CONTEXT for request in engine.requests)
        assert_requests_match(engine, lm, spec, masks_for(model, 1)[:3])


def test_a_continuation_longer_than_the_context_is_refused_as_lm_eval_refuses_it(long_folder, tokenizer):
    model = short_context_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = harness.load_tasks(["toy_too_long"], include_paths=[long_folder])
    with pytest.raises(EvaluationError, match="lm-eval refused a request") as refused:
        harness.run_tasks(lm, specs)  # lm-eval's loop: ``assert len(continuation_enc) <= self.max_length``
    assert isinstance(refused.value.__cause__, AssertionError)
    with pytest.raises(EvaluationError) as info:
        Engine(model, lm, specs, batch_size=4)
    message = info.value.message
    assert message.startswith("task 'toy_too_long' doc 2 choice 1: a continuation of ") and "context of 8" in message
    assert "\n" not in message and "lm-eval" in info.value.hint


def test_bfloat16_engine_keeps_its_contract_with_lm_eval(toy_folder, tokenizer):
    """The bf16 contract (cornerstone/engine.py's docstring): a bf16 forward rounds differently in
    another batch shape, and lm-eval takes its log-softmax in bf16 where the engine takes it in float32,
    so each request's loglikelihood may differ from lm-eval's by up to ``bf16_tolerance``, and a
    document's result may differ only where lm-eval's two best choices are within their tolerances."""
    model = tiny_model("llama").to(torch.bfloat16)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    [spec] = harness.load_tasks(["toy_engine_acc"], include_paths=[toy_folder])  # acc: the best raw loglikelihood wins
    engine = Engine(model, lm, [spec], batch_size=4)
    differs = 0
    for mask in masks_for(model, 1)[:3]:
        by_doc: dict[int, list] = {}
        for instance, mine, theirs in paired_loglikelihoods(engine, lm, spec, mask):
            assert abs(mine[0] - theirs[0]) <= bf16_tolerance(theirs[0]), (instance.doc_id, mine, theirs)
            differs += mine[0] != theirs[0]
            by_doc.setdefault(instance.doc_id, []).append((instance, mine, theirs))
        for doc_id, requests in by_doc.items():
            doc = requests[0][0].doc
            ours = harness.score_doc(spec, doc, [mine for _, mine, _ in requests], doc_id)
            reference = harness.score_doc(spec, doc, [theirs for _, _, theirs in requests], doc_id)
            if ours != reference:
                best, second = sorted((theirs[0] for _, _, theirs in requests), reverse=True)[:2]
                assert best - second <= bf16_tolerance(best) + bf16_tolerance(second), doc_id
    assert differs  # the two loops do round differently in bf16: the contract is not vacuous


def bf16_tolerance(loglikelihood):
    """How far a bf16 loglikelihood may be from lm-eval's: 1% of it plus 0.01 (measured: <= 0.6%)."""
    return 0.01 * abs(loglikelihood) + 0.01


def test_prefix_cache_honours_its_budget(toy_folder, tokenizer):
    model = tiny_model("qwen2")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = harness.load_tasks(["toy_engine"], include_paths=[toy_folder])
    full = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model, 1))
    one_block = full.cache_size_bytes // 2
    small = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model, 1), cache_bytes=one_block)
    assert 0 < small.cache_size_bytes <= one_block
    none = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model, 1), cache_bytes=one_block - 1)
    assert none.cache_size_bytes == 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_masks_in_one_call_share_prefixes_and_equal_lm_eval(model_type, toy_folder, tokenizer):
    model = tiny_model(model_type)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = harness.load_tasks(["toy_engine"], include_paths=[toy_folder])
    sublayers, blocks = enumerate_players(model), enumerate_players(model, "block")
    # a removal chain (as permutation sampling walks it), a duplicate, the empty mask, mixed masks
    chain = [sublayers[2:k] for k in range(3, len(sublayers) + 1)]
    masks = chain + [[sublayers[3], sublayers[2]], [], [blocks[1], sublayers[0]], [blocks[2]], masks_for(model)[4]]
    masks = masks[::-1]
    for budget in (2 << 30, 0):
        engine = Engine(model, lm, specs, batch_size=4, cache_bytes=budget)
        results = dict(engine.task_results_many(masks))
        assert sorted(results) == list(range(len(masks)))
        alone = Engine(model, lm, specs, batch_size=4, cache_bytes=0)
        for index, mask in enumerate(masks):
            with without(model, mask):
                reference = harness.run_tasks(lm, specs)
            assert results[index][specs[0].name].per_doc == reference[specs[0].name].per_doc
            alone.task_results(mask)
        n_batches, n_blocks = len(engine.batches), len(blocks)
        # the runner does what the model-free schedule says: one full pass, then each run from its start
        hidden = model.config.get_text_config().hidden_size
        state_bytes = [batch.inputs.numel() * hidden * 4 for batch in engine.batches]
        steps = schedule(masks, n_blocks=n_blocks, state_bytes=state_bytes, budget=budget - engine.cache_size_bytes,
                         cached=plan_cache(n_blocks, sum(state_bytes), budget))
        assert [step.mask for step in steps] == list(results)
        assert engine.block_passes == n_batches * n_blocks + sum(n_blocks - run.start for step in steps for run in step.runs)
        if budget:
            # the chain's k-th mask differs from the (k-1)-th only from block (k+1)//2 on
            assert engine.block_passes < alone.block_passes - n_batches * n_blocks
        else:
            assert engine.block_passes == alone.block_passes  # nothing kept, nothing reused


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_work_the_engine_counts_is_the_work_torch_counts(model_type, toy_folder, tokenizer):
    """Engine.linear_flops and attention_flops (what bench/engine_bound.py's matmul bound divides) against
    torch's own FLOP counter over the same evaluations: prefix reuse, removed players and scored
    positions only must all show in both, and removed players cost nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(model_type)
    model.set_attn_implementation("eager")  # attention as matmuls torch counts (it does not count CPU sdpa)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    engine = Engine(model, lm, harness.load_tasks(["toy_engine"], include_paths=[toy_folder]), batch_size=4)
    sublayers, blocks = enumerate_players(model), enumerate_players(model, "block")
    # the full pass, whose states later masks start from, and a first call of each removed module kind,
    # which runs it once to learn what it returns (masking._skipping)
    engine.task_results([sublayers[0], sublayers[1], blocks[1]])
    previous = None
    for mask in ([sublayers[-1]], [blocks[1]], [sublayers[0], blocks[2]], sublayers[1:]):
        before = engine.linear_flops + engine.attention_flops
        with FlopCounterMode(display=False) as counter:
            engine.task_results(mask)
        counted = engine.linear_flops + engine.attention_flops - before
        assert counted == counter.get_total_flops(), [p.name for p in mask]
        assert counted != previous
        previous = counted


@pytest.mark.slow
def test_engine_equals_lm_eval_on_smollm2_with_real_and_bundled_tasks(smollm2, shared_data, tmp_path):
    specs = harness.load_tasks(["cs_real_arc_easy", "cs_capitals", "cs_antonyms"], limit=12, seed=3)
    # partial scoring (one context per choice) and greedy-continuation accuracy take other paths through lm-eval
    specs += harness.load_tasks(["cs_real_winogrande", "cs_real_lambada_openai", "cs_real_copa"], limit=4, seed=3)
    lm = harness.make_lm(smollm2.model, smollm2.tokenizer, batch_size=8)
    # a float32 tie between two choices would be the only licence to differ; none occurs on these docs
    assert_engine_matches_lm_eval(smollm2.model, lm, specs, masks_for(smollm2.model, 2, seed=1))
