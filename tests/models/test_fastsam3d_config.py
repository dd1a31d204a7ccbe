"""FastSAM3DConfig: released sizes, reference JSON layouts, round trip, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export_engine.errors import UsageError
from export_engine.models.fastsam3d import FastSAM3DConfig


def test_released_matches_state_dict_full_config(fastsam3d_ref: Path) -> None:
    data = json.loads((fastsam3d_ref / "state_dict_full.json").read_text())
    assert FastSAM3DConfig.from_json(data) == FastSAM3DConfig.released()
    assert FastSAM3DConfig.from_json(data["config"]) == FastSAM3DConfig.released()


def test_released_sizes() -> None:
    cfg = FastSAM3DConfig.released()
    assert (cfg.img_size, cfg.grid, cfg.num_tokens, cfg.encoder_head_dim) == (128, 8, 512, 128)
    assert (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads, cfg.skip_layer) == (768, 6, 6, 2)
    assert (cfg.prompt_embed_dim, cfg.mask_input_size, cfg.num_mask_tokens) == (384, 32, 4)
    assert (cfg.encoder_layernorm_eps, cfg.layernorm3d_eps, cfg.decoder_layernorm_eps) == (1e-6, 1e-6, 1e-5)


def test_reference_config_json_layout(fastsam3d_ref: Path) -> None:
    data = json.loads((fastsam3d_ref / "config.json").read_text())
    cfg = FastSAM3DConfig.from_json(data)
    assert (cfg.img_size, cfg.patch_size, cfg.encoder_embed_dim, cfg.encoder_depth) == (64, 8, 96, 4)
    assert (cfg.encoder_num_heads, cfg.prompt_embed_dim, cfg.iou_head_hidden_dim) == (3, 96, 64)
    derived = data["derived"]
    assert (cfg.grid, cfg.num_tokens, cfg.encoder_head_dim) == (
        derived["token_grid"],
        derived["num_tokens"],
        derived["encoder_head_dim"],
    )
    assert (cfg.mask_input_size, cfg.num_mask_tokens) == (
        derived["mask_input_size"],
        derived["num_mask_tokens"],
    )


def test_to_dict_round_trips_through_json() -> None:
    cfg = FastSAM3DConfig(img_size=32, patch_size=8, encoder_embed_dim=48, encoder_num_heads=2, prompt_embed_dim=48)
    text = json.dumps(cfg.to_dict())
    assert FastSAM3DConfig.from_json(json.loads(text)) == cfg


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"img_size": 100}, "multiple of patch_size"),
        ({"encoder_num_heads": 5}, "divisible by encoder_num_heads"),
        ({"window_size": 14}, "window_size"),
        ({"skip_layer": 7}, "skip_layer"),
        ({"encoder_depth": 0}, "encoder_depth"),
        ({"prompt_embed_dim": 100}, "prompt_embed_dim"),
        ({"mask_in_chans": 6}, "mask_in_chans"),
        ({"decoder_num_heads": 7}, "decoder_num_heads"),
        ({"patch_size": True}, "patch_size"),
        ({"encoder_layernorm_eps": 0.0}, "encoder_layernorm_eps"),
        ({"layer_norm_eps": 1e-5}, "given twice"),
        ({"mlp_ratio": -1}, "mlp_ratio"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
        ({"patch_sise": 16}, "unknown field"),
        ({"global_attn_indexes": [2, "5"]}, "global_attn_indexes"),
    ],
)
def test_invalid_values_raise_usage_error(changes: dict[str, object], needle: str) -> None:
    data = {**FastSAM3DConfig.released().to_dict(), **changes}
    with pytest.raises(UsageError, match=needle):
        FastSAM3DConfig.from_json(data)


def test_reference_layout_ignores_unknown_model_fields(fastsam3d_ref: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = json.loads((fastsam3d_ref / "config.json").read_text())
    data["model"]["future_knob"] = 1
    assert FastSAM3DConfig.from_json(data).img_size == 64
    assert "future_knob" in caplog.text


def test_not_a_mapping_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="JSON object"):
        FastSAM3DConfig.from_json([1, 2])  # type: ignore[arg-type]
