"""Masking: nothing masked changes nothing, a masked part contributes exactly zero, and exits restore the model."""

import pytest
import torch

from cornerstone.masking import without
from cornerstone.players import enumerate_players, parse_players

from .architectures import TABLE_NAMES, table_model

INPUT = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11, 64, 8]])


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def capture_block(model, player_block):
    """Record the hidden state entering and leaving one decoder block."""
    seen = {}
    module = model.get_submodule(player_block.module_path)

    def pre(_m, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def post(_m, _args, output):
        seen["out"] = (output[0] if isinstance(output, tuple) else output).clone()

    return seen, module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_masking_nothing_gives_identical_logits(model_type):
    model = table_model(model_type)
    before = logits(model)
    with without(model, []):
        during = logits(model)
    assert torch.equal(before, during)


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_masking_restores_the_model_on_exit_even_after_an_error(model_type):
    model = table_model(model_type)
    before, hooks = logits(model), hook_count(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    players = enumerate_players(model) + enumerate_players(model, "block")[1:2]
    with without(model, players):
        assert not torch.equal(logits(model), before)
    with pytest.raises(RuntimeError):
        with without(model, players):
            raise RuntimeError("boom")
    assert hook_count(model) == hooks
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_a_block_with_both_sublayers_removed_is_exactly_the_identity(model_type):
    model = table_model(model_type)
    block = enumerate_players(model, "block")[1]
    seen, *handles = capture_block(model, block)
    with without(model, parse_players(model, ["L1.attn", "L1.mlp"])):
        logits(model)
    for handle in handles:
        handle.remove()
    assert torch.equal(seen["in"], seen["out"])


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_a_removed_block_is_the_identity(model_type):
    model = table_model(model_type)
    block = enumerate_players(model, "block")[0]
    with without(model, [block]):
        # registered after the mask's hook, so it sees what the rest of the model sees
        seen, *handles = capture_block(model, block)
        logits(model)
    for handle in handles:
        handle.remove()
    assert torch.equal(seen["in"], seen["out"])


@pytest.mark.parametrize("model_type", TABLE_NAMES)
@pytest.mark.parametrize("player_id", ["L1.attn", "L1.mlp", "L2"])
def test_a_removed_player_contributes_zero(model_type, player_id):
    """Scrambling a removed player's weights cannot change the output; unmasked, it does."""
    model = table_model(model_type)
    [player] = parse_players(model, [player_id])
    with without(model, [player]):
        masked = logits(model)
    with torch.no_grad():
        for parameter in model.get_submodule(player.module_path).parameters():
            parameter.copy_(torch.randn_like(parameter))
    with without(model, [player]):
        assert torch.equal(logits(model), masked)
    assert not torch.allclose(logits(model), masked)


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_a_removed_player_is_not_computed(model_type):
    """No weight of a removed player takes part in the forward (the first call of a module class may run
    once, to learn what it returns): a second masked forward calls none of its modules that hold weights."""
    model = table_model(model_type)
    players = parse_players(model, ["L1.attn", "L0.mlp", "L2"])
    calls = []
    handles = [module.register_forward_hook(lambda *_: calls.append(1))
               for player in players for module in model.get_submodule(player.module_path).modules()
               if any(True for _ in module.parameters(recurse=False))]
    with without(model, players):
        logits(model)
    calls.clear()
    with without(model, players):
        logits(model)
    assert calls == []
    logits(model)
    assert calls  # unmasked, the same hooks fire: the check can fail
    for handle in handles:
        handle.remove()
