import pytest
import torch

from cornerstone.errors import PlayerError, UnsupportedArchitectureError
from cornerstone.players import ARCHITECTURES, architecture, enumerate_players, parse_players

from .architectures import TABLE_NAMES, table_model
from .conftest import tiny_model


def test_every_row_of_the_table_has_a_tiny_model():
    """The parametrised tests below (and the masking and engine tests) cover the whole table: a row
    without a tiny model would be a family no test has enumerated, masked or scored."""
    assert sorted(ARCHITECTURES) == TABLE_NAMES
    for model_type in TABLE_NAMES:
        assert architecture(table_model(model_type)) is ARCHITECTURES[model_type]


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_sublayer_players_cover_attention_and_ffn_of_every_block(model_type):
    model = table_model(model_type)
    players = enumerate_players(model)
    assert [p.name for p in players] == [f"L{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    for player in players:
        module = model.get_submodule(player.module_path)
        name = type(module).__name__.lower()
        if player.kind == "attn":
            assert "attention" in name, (player, name)
        else:
            # dense FFNs are "...MLP"; MoE layers are "...SparseMoeBlock"/"...Moe..."
            assert "mlp" in name or "moe" in name, (player, name)
            if architecture(model).moe:
                assert any("expert" in n for n, _ in module.named_modules()), name


@pytest.mark.parametrize("model_type", TABLE_NAMES)
def test_block_players_are_the_decoder_blocks(model_type):
    model = table_model(model_type)
    players = enumerate_players(model, "block")
    assert [p.name for p in players] == ["L0", "L1", "L2"]
    modules = [model.get_submodule(p.module_path) for p in players]
    assert all("layer" in type(m).__name__.lower() or "block" in type(m).__name__.lower() for m in modules)
    assert len({id(m) for m in modules}) == 3


def test_unknown_architecture_names_the_supported_ones():
    class Bert(torch.nn.Module):
        config = type("Config", (), {"model_type": "bert"})()

    with pytest.raises(UnsupportedArchitectureError) as info:
        enumerate_players(Bert())
    assert "bert" in info.value.message
    assert "llama" in info.value.hint and "gpt_neox" in info.value.hint


def test_parse_players_accepts_ids_and_rejects_bad_ones():
    model = tiny_model("llama")
    chosen = parse_players(model, "L0.attn, L2")
    assert [(p.name, p.kind) for p in chosen] == [("L0.attn", "attn"), ("L2", "block")]
    with pytest.raises(PlayerError, match="out of range"):
        parse_players(model, ["L3.mlp"])
    for bad in ("L0.ffn", "layer0", "L-1", "0.attn"):
        with pytest.raises(PlayerError, match="not a player id"):
            parse_players(model, [bad])
