"""The portable model directory: round trip, strict loading and the errors people see."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtr_scale.models.dit import DiT
from dtr_scale.models.model_dir import (
    build_model_from_config,
    data_section,
    load_model_dir,
    make_config,
    read_config,
    save_model_dir,
)

DATA = {
    "latent_shape": [4, 8, 8],
    "scaling_factor": 1.0,
    "vae": {"name": "builtin-pixel-unshuffle", "downscale_factor": 2},
    "image_size": 16,
    "labels": [str(i) for i in range(10)],
    "manifest": None,
}


def tiny_dit(seed: int = 0, routing: dict | None = None) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                routing=routing)  # fmt: skip
    for p in model.parameters():  # leave adaLN-Zero: a round trip must carry non-zero values everywhere
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture()
def routed() -> DiT:
    return tiny_dit(routing={"alpha": 4.0, "beta": 0.8, "num_tasks": 1000})


def test_round_trip_restores_model_and_ema_weights_exactly(tmp_path, routed):
    ema = tiny_dit(seed=1, routing={"alpha": 4.0, "beta": 0.8, "num_tasks": 1000})
    config = make_config(
        routed, DATA, name=None, train={"step": 7, "samples_seen": 56, "run_dir": "r", "tag": "t"}
    )
    save_model_dir(tmp_path / "m", routed.state_dict(), ema.state_dict(), config)
    for weights, source in (("model", routed), ("ema", ema)):
        loaded, loaded_config = load_model_dir(tmp_path / "m", weights=weights)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert loaded_config == config
        assert not loaded.training


def test_loaded_model_rebuilds_the_dtr_mask_table_and_matches_outputs(tmp_path, routed):
    save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA))
    loaded, _ = load_model_dir(tmp_path / "m", weights="model")
    assert torch.equal(loaded.mask_table, routed.mask_table)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 2])
    routed.eval()
    assert torch.equal(loaded(x, t, y), routed(x, t, y))


def test_weight_files_use_reference_dit_keys_without_mask_table(tmp_path, routed):
    save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA))
    keys = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert "pos_embed" in keys and "mask_table" not in keys
    assert {
        "x_embedder.proj.weight",
        "y_embedder.embedding_table.weight",
        "blocks.1.adaLN_modulation.1.weight",
    } <= keys


def test_bf16_dir_stores_bf16_and_loads_into_fp32(tmp_path, routed):
    save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA), dtype=torch.bfloat16)
    assert load_file(tmp_path / "m" / "model.safetensors")["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    loaded, _ = load_model_dir(tmp_path / "m", weights="model")
    weight = loaded.blocks[0].attn.qkv.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, routed.blocks[0].attn.qkv.weight.to(torch.bfloat16).float())


def test_config_without_routing_builds_plain_dit():
    config = make_config(tiny_dit(), DATA)
    assert config["routing"]["enabled"] is False
    assert build_model_from_config(config).mask_table is None


def test_rewriting_a_model_dir_replaces_it_and_leaves_no_temporaries(tmp_path, routed):
    config = make_config(routed, DATA)
    save_model_dir(tmp_path / "m", routed.state_dict(), routed.state_dict(), config)
    save_model_dir(tmp_path / "m", routed.state_dict(), None, config)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")


def test_directory_without_config_json_is_reported(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_dir(tmp_path / "m")


def test_missing_ema_weights_name_the_file_and_the_alternative(tmp_path, routed):
    save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA))
    with pytest.raises(FileNotFoundError, match=r"ema\.safetensors does not exist.*weights='model'"):
        load_model_dir(tmp_path / "m", weights="ema")


def test_shape_mismatch_names_the_tensor(tmp_path, routed):
    save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA))
    state = load_file(tmp_path / "m" / "model.safetensors")
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(3, 64)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc1\.weight' has shape \(3, 64\)"):
        load_model_dir(tmp_path / "m", weights="model")


def test_saving_weights_of_another_architecture_is_refused(tmp_path, routed):
    config = make_config(routed, DATA)
    config["model"]["depth"] = 3
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.2\."):
        save_model_dir(tmp_path / "m", routed.state_dict(), None, config)
    assert not (tmp_path / "m").exists()


def test_wrapper_prefixed_keys_get_a_hint(tmp_path, routed):
    state = {f"module.{k}": v for k, v in routed.state_dict().items()}
    with pytest.raises(ValueError, match="wrapper prefix"):
        save_model_dir(tmp_path / "m", state, None, make_config(routed, DATA))


def test_config_with_a_missing_key_names_it(tmp_path, routed):
    save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA))
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    del document["routing"]["beta"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"'routing\.beta' is missing"):
        read_config(tmp_path / "m")


def test_latent_shape_must_match_the_architecture(routed):
    with pytest.raises(ValueError, match="latent_shape"):
        make_config(routed, {**DATA, "latent_shape": [4, 16, 16]})


def test_refuses_to_replace_a_directory_that_is_not_a_model_dir(tmp_path, routed):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dtr-scale model directory"):
        save_model_dir(tmp_path / "m", routed.state_dict(), None, make_config(routed, DATA))
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_data_section_comes_from_a_shard_manifest(tmp_path):
    from dtr_scale.data.shards import load_manifest, write_manifest

    shards = [{"name": "shard-000000.tar", "num_samples": 1, "sha256": "0" * 64}]
    path = write_manifest(tmp_path, shards, latent_shape=(4, 8, 8), scaling_factor=0.5, vae=DATA["vae"],
                          image_size=16, labels=DATA["labels"])  # fmt: skip
    section = data_section(load_manifest(path))
    assert section == {**DATA, "scaling_factor": 0.5, "manifest": str(path.resolve())}
    assert make_config(tiny_dit(), section)["data"] == section
