"""The fast engine gives lm-eval's per-document results under any mask, within a bounded prefix cache."""

import random

import pytest

from cornerstone import harness
from cornerstone.engine import Engine
from cornerstone.masking import removed
from cornerstone.players import enumerate_players

from .conftest import ARCHITECTURE_NAMES, tiny_model
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
        with removed(model, mask):
            reference = harness.evaluate(lm, specs)
        ours = engine.evaluate(mask)
        for spec in specs:
            assert ours[spec.name].per_doc == reference[spec.name].per_doc, [p.name for p in mask]
            assert ours[spec.name].score == pytest.approx(reference[spec.name].score, abs=1e-12)
    return engine


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_engine_equals_lm_eval_per_document(model_type, toy_folder, tokenizer):
    model = tiny_model(model_type)
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    specs = harness.load_tasks(["toy_engine", "toy_engine_acc"], include_paths=[toy_folder])
    engine = assert_engine_matches_lm_eval(model, lm, specs, masks_for(model))
    assert engine.cache_size_bytes > 0
    # the tiny Gemma 3 has a 4-token sliding window, shorter than the requests: one mask cannot serve
    # its full and sliding layers, so it runs unpacked
    assert engine.packed == (model_type != "gemma3_text")


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
    assert sum(batch.inputs.shape[0] for batch in packed._batches) == 12
    for mask in masks_for(model, 1):
        ours, theirs = packed.loglikelihoods(mask), plain.loglikelihoods(mask)
        assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-5)


def test_engine_loglikelihoods_equal_lm_eval_requests(toy_folder, tokenizer):
    model = tiny_model("llama")
    lm = harness.make_lm(model, tokenizer, batch_size=4)
    [spec] = harness.load_tasks(["toy_engine"], include_paths=[toy_folder])
    engine = Engine(model, lm, [spec], batch_size=3)
    players = enumerate_players(model)
    for mask in ([], [players[2]]):
        ours = engine.loglikelihoods(mask)
        spec.task.build_all_requests(samples=spec.doc_indices, rank=0, world_size=1)
        with removed(model, mask):
            theirs = lm.loglikelihood(spec.task.instances, disable_tqdm=True)
        for instance, (ll, greedy) in zip(spec.task.instances, theirs):
            mine = ours[engine._lookup(*lm._encode_pair(*instance.args))]
            assert mine[0] == pytest.approx(ll, abs=1e-4) and mine[1] == greedy


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
        results = dict(engine.evaluate_many(masks))
        assert sorted(results) == list(range(len(masks)))
        alone = Engine(model, lm, specs, batch_size=4, cache_bytes=0)
        for index, mask in enumerate(masks):
            with removed(model, mask):
                reference = harness.evaluate(lm, specs)
            assert results[index][specs[0].name].per_doc == reference[specs[0].name].per_doc
            alone.evaluate(mask)
        n_batches, n_blocks = len(engine._batches), len(engine._layers)
        if budget:
            # the chain's k-th mask differs from the (k-1)-th only from block (k+1)//2 on
            assert engine.block_passes < alone.block_passes - n_batches * n_blocks
        else:
            assert engine.block_passes == alone.block_passes  # nothing kept, nothing reused


@pytest.mark.slow
def test_engine_equals_lm_eval_on_smollm2_with_real_and_bundled_tasks(smollm2, shared_data, tmp_path):
    specs = harness.load_tasks(["cs_real_arc_easy", "cs_capitals", "cs_antonyms"], limit=12, seed=3)
    # partial scoring (one context per choice) and greedy-continuation accuracy take other paths through lm-eval
    specs += harness.load_tasks(["cs_real_winogrande", "cs_real_lambada_openai", "cs_real_copa"], limit=4, seed=3)
    lm = harness.make_lm(smollm2.model, smollm2.tokenizer, batch_size=8)
    # a float32 tie between two choices would be the only licence to differ; none occurs on these docs
    assert_engine_matches_lm_eval(smollm2.model, lm, specs, masks_for(smollm2.model, 2, seed=1))
