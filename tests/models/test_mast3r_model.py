"""Our MASt3R against the upstream reference vectors (small model) plus config / structure checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export_engine.errors import ModelInputError, UsageError
from export_engine.models.mast3r import (
    OFFICIAL_CONSTRUCTOR,
    OUTPUT_NAMES,
    MASt3R,
    MASt3RConfig,
    build_mast3r,
    init_random_weights,
)
from export_engine.models.mast3r.rope import grid_positions, rope_2d

F32 = {"rtol": 1e-4, "atol": 1e-4}
F64 = {"rtol": 1e-8, "atol": 1e-8}


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _assert_close(actual: torch.Tensor, expected: np.ndarray, name: str, tol: dict[str, float]) -> None:
    got = actual.detach().numpy()
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    err = float(np.abs(got - expected).max())
    assert np.allclose(got, expected, **tol), f"{name}: max |diff| {err:.3g} over {tol}"


@pytest.fixture(scope="module")
def small_config(mast3r_ref: Path) -> MASt3RConfig:
    return MASt3RConfig.from_json(json.loads((mast3r_ref / "config.json").read_text()))


@pytest.fixture(scope="module", params=["explicit", "sdpa"])
def small_model(request: pytest.FixtureRequest, mast3r_ref: Path, small_config: MASt3RConfig) -> MASt3R:
    model, _, _ = build_mast3r(small_config, str(mast3r_ref / "model.safetensors"), attn_impl=request.param)
    return model


@pytest.fixture(scope="module")
def small_model64(mast3r_ref: Path, small_config: MASt3RConfig) -> MASt3R:
    model, _, _ = build_mast3r(small_config, str(mast3r_ref / "model.safetensors"))
    return model.double()


def _run(model: MASt3R, inputs: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    img1 = torch.from_numpy(inputs["view1_img"]).to(dtype)
    img2 = torch.from_numpy(inputs["view2_img"]).to(dtype)
    with torch.no_grad():
        return model(img1, img2)


# ----------------------------------------------------------------------------------------------------------
# Reference outputs


@pytest.mark.parametrize("case", ["", "_mixed"])
def test_outputs_float32(small_model: MASt3R, mast3r_ref: Path, case: str) -> None:
    expected = _npz(mast3r_ref / f"outputs{case}.npz")
    result = _run(small_model, _npz(mast3r_ref / f"inputs{case}.npz"), torch.float32)
    assert tuple(result) == OUTPUT_NAMES == tuple(expected)
    for name in OUTPUT_NAMES:
        assert result[name].dtype == torch.float32
        _assert_close(result[name], expected[name], name, F32)


@pytest.mark.parametrize("case", ["", "_mixed"])
def test_outputs_float64(small_model64: MASt3R, mast3r_ref: Path, case: str) -> None:
    expected = _npz(mast3r_ref / f"outputs{case}_float64.npz")
    result = _run(small_model64, _npz(mast3r_ref / f"inputs{case}.npz"), torch.float64)
    for name in OUTPUT_NAMES:
        assert result[name].dtype == torch.float64
        _assert_close(result[name], expected[name], name, F64)


def test_intermediates(small_model: MASt3R, mast3r_ref: Path) -> None:
    ref = _npz(mast3r_ref / "intermediates.npz")
    inputs = _npz(mast3r_ref / "inputs.npz")
    model = small_model
    shape = inputs["view1_img"].shape[-2:]
    grid = (shape[0] // 16, shape[1] // 16)
    img = torch.from_numpy(np.concatenate([inputs["view1_img"], inputs["view2_img"]]))  # batched, as upstream

    def check(stage: str, both: torch.Tensor) -> None:
        for view, tensor in zip(("view1", "view2"), both.chunk(2), strict=True):
            _assert_close(tensor, ref[f"{view}_{stage}"], f"{view}_{stage}", F32)

    with torch.no_grad():
        x = model.patch_embed(img)
        check("patch_embed", x)
        positions = grid_positions(*grid)
        for view in ("view1", "view2"):
            assert torch.equal(positions, torch.from_numpy(ref[f"{view}_pos"][0]))
        rope = model.rope(grid, model.config.enc_embed_dim // model.config.enc_num_heads, x)
        for i, block in enumerate(model.enc_blocks):
            x = block(x, rope)
            check(f"enc_block{i}", x)
        x = model.enc_norm(x)
        check("enc_out", x)
        check("decoder_embed", model.decoder_embed(x))
        feat1, feat2 = x.chunk(2)
        outs1, outs2 = model.decoder_outputs(feat1, feat2, tuple(shape), tuple(shape))
        assert len(outs1) == len(outs2) == model.config.dec_depth + 1
        for i, (out1, out2) in enumerate(zip(outs1, outs2, strict=True)):
            check(f"decout{i}", torch.cat((out1, out2)))
        for view, head, outs in (
            ("view1", model.downstream_head1, outs1),
            ("view2", model.downstream_head2, outs2),
        ):
            _assert_close(head.dpt(outs, tuple(shape)), ref[f"{view}_dpt_raw"], f"{view}_dpt_raw", F32)
            mlp_raw = head.head_local_features(torch.cat((outs[0], outs[-1]), dim=-1))
            _assert_close(mlp_raw, ref[f"{view}_localfeat_mlp_raw"], f"{view}_localfeat_mlp_raw", F32)


def test_rope(mast3r_ref: Path) -> None:
    ref = _npz(mast3r_ref / "rope.npz")
    tokens, positions = torch.from_numpy(ref["tokens"]), torch.from_numpy(ref["positions"])
    out = rope_2d(tokens, positions, base=float(ref["base"]), f0=float(ref["F0"]))
    _assert_close(out, ref["output"], "rope", {"rtol": 1e-6, "atol": 1e-6})
    # Positions without a batch dimension (what the model uses) give the same result.
    assert torch.equal(rope_2d(tokens, positions[0], base=100.0), out)
    assert torch.equal(positions[0], grid_positions(3, 5))


def test_symmetric_decode(small_model: MASt3R, mast3r_ref: Path) -> None:
    """Decoder + heads with the views swapped (sparse_ga.symmetric_inference's 2->1 pass)."""
    ref = _npz(mast3r_ref / "symmetric.npz")
    inputs = _npz(mast3r_ref / "inputs.npz")
    shape = tuple(inputs["view1_img"].shape[-2:])
    with torch.no_grad():
        feat1 = small_model.encode(torch.from_numpy(inputs["view1_img"]))
        feat2 = small_model.encode(torch.from_numpy(inputs["view2_img"]))
        result = small_model.decode(feat2, feat1, shape, shape)
    names = {
        "res22_pts3d": "view1_pts3d",  # head 1 on view 2 as reference
        "res22_conf": "view1_conf",
        "res22_desc": "view1_desc",
        "res22_desc_conf": "view1_desc_conf",
        "res12_pts3d": "view2_pts3d_in_other_view",  # head 2 on view 1, in view 2's frame
        "res12_conf": "view2_conf",
        "res12_desc": "view2_desc",
        "res12_desc_conf": "view2_desc_conf",
    }
    for ref_name, ours in names.items():
        _assert_close(result[ours], ref[ref_name], ref_name, F32)


# ----------------------------------------------------------------------------------------------------------
# Model behaviour (random weights, no reference needed)


def _tiny_config(**overrides: object) -> MASt3RConfig:
    values: dict[str, object] = dict(
        enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=16, dec_depth=2, dec_num_heads=1,
        local_feat_dim=4, dpt_feature_dim=8, dpt_last_dim=8, dpt_layer_dims=(4, 4, 8, 8),
    )  # fmt: skip
    values.update(overrides)
    return MASt3RConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_model() -> MASt3R:
    model, _, _ = build_mast3r(_tiny_config(), random_seed=7)
    return model


def test_shapes_odd_grids_and_orientations(tiny_model: MASt3R) -> None:
    # 80x112 -> 5x7 tokens (odd: exercises the DPT crop); portrait vs landscape views of different sizes.
    img1, img2 = torch.randn(2, 3, 80, 112), torch.randn(2, 3, 112, 48)
    with torch.no_grad():
        out = tiny_model(img1, img2)
    assert out["view1_pts3d"].shape == (2, 80, 112, 3)
    assert out["view1_desc"].shape == (2, 80, 112, 4)
    assert out["view2_pts3d_in_other_view"].shape == (2, 112, 48, 3)
    assert out["view2_desc_conf"].shape == (2, 112, 48)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["view1_conf"] > 1).all() and (out["view1_desc_conf"] > 0).all()
    assert torch.allclose(out["view2_desc"].norm(dim=-1), torch.ones(()), atol=1e-5)


def test_batched_encoder_matches_separate(tiny_model: MASt3R) -> None:
    img1, img2 = torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        batched = tiny_model(img1, img2)
        separate = tiny_model.decode(tiny_model.encode(img1), tiny_model.encode(img2), (32, 48), (32, 48))
    for name in OUTPUT_NAMES:
        assert torch.allclose(batched[name], separate[name], rtol=1e-5, atol=1e-5), name


def test_bad_input_size(tiny_model: MASt3R) -> None:
    with pytest.raises(ModelInputError, match="multiples of 16"):
        tiny_model.encode(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ModelInputError, match=r"\(B, 3, H, W\)"):
        tiny_model.encode(torch.zeros(3, 32, 32))


def test_attn_impl() -> None:
    with pytest.raises(UsageError, match="explicit"):
        MASt3R(_tiny_config(), attn_impl="flash")
    explicit, _, _ = build_mast3r(_tiny_config(), random_seed=3)
    sdpa, _, _ = build_mast3r(_tiny_config(), random_seed=3, attn_impl="sdpa")
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = explicit(img, img.flip(-1)), sdpa(img, img.flip(-1))
    for name in OUTPUT_NAMES:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-4), name


def test_aliases_and_dead_weights(tiny_model: MASt3R) -> None:
    scratch = tiny_model.downstream_head1.dpt.scratch
    assert scratch.layer_rn[0] is scratch.layer1_rn and scratch.layer_rn[3] is scratch.layer4_rn
    assert not list(tiny_model.buffers())
    img1, img2 = torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        before = tiny_model(img1, img2)
        saved = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        tiny_model.mask_token.add_(5.0)
        for head in (tiny_model.downstream_head1, tiny_model.downstream_head2):
            for param in head.dpt.scratch.refinenet4.resConfUnit1.parameters():
                param.add_(5.0)
        after = tiny_model(img1, img2)
        tiny_model.load_state_dict(saved)
    for name in OUTPUT_NAMES:
        assert torch.equal(before[name], after[name]), name


def test_two_confs_false_copies_conf() -> None:
    model, _, _ = build_mast3r(_tiny_config(two_confs=False), random_seed=1)
    assert model.downstream_head1.head_local_features.fc2.out_features == 4 * 256
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))
    assert torch.equal(out["view1_desc_conf"], out["view1_conf"])


def test_init_random_weights_deterministic() -> None:
    with torch.device("meta"):
        a = MASt3R(_tiny_config())
    a.to_empty(device="cpu")
    init_random_weights(a, 11)
    b, _, _ = build_mast3r(_tiny_config(), random_seed=11)
    c, _, _ = build_mast3r(_tiny_config(), random_seed=12)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(sd_a["enc_blocks.0.attn.qkv.weight"], sd_c["enc_blocks.0.attn.qkv.weight"])
    assert all(torch.isfinite(v).all() and v.std() > 0 for v in sd_b.values() if v.numel() > 1)
    fc1 = sd_b["enc_blocks.0.mlp.fc1.weight"]
    assert abs(float(fc1.std()) - 1 / math.sqrt(32)) < 0.02
    assert not b.training and not any(p.requires_grad for p in b.parameters())


# ----------------------------------------------------------------------------------------------------------
# Configuration


def test_official_config() -> None:
    official = MASt3RConfig.official()
    assert official == MASt3RConfig()
    assert official.hooks == (0, 6, 9, 12)
    assert MASt3RConfig.from_dict(json.loads(json.dumps(official.to_dict()))) == official


def test_config_from_reference_json(mast3r_ref: Path, small_config: MASt3RConfig) -> None:
    data = json.loads((mast3r_ref / "config.json").read_text())
    assert (small_config.enc_embed_dim, small_config.dec_depth, small_config.local_feat_dim) == (96, 4, 8)
    assert small_config.dpt_layer_dims == (16, 24, 32, 48) and small_config.hooks == (0, 2, 3, 4)
    other_hooks = MASt3RConfig.from_json({**data, "dpt": {**data["dpt"], "hooks": [0, 1, 2, 4]}})
    assert other_hooks.hooks == other_hooks.dpt_hooks == (0, 1, 2, 4)
    string_only = {"constructor_string": data["constructor_string"], "dpt": data["dpt"]}
    from_string = MASt3RConfig.from_json(string_only)
    assert from_string == small_config
    flat = MASt3RConfig.from_json({**data["constructor_kwargs"], "dpt": data["dpt"]})
    assert flat == small_config
    round_trip = MASt3RConfig.from_json(json.loads(json.dumps(small_config.to_dict())))
    assert round_trip == small_config


def test_training_constructor_string_maps_to_inference() -> None:
    training = OFFICIAL_CONSTRUCTOR.replace("PatchEmbedDust3R", "ManyAR_PatchEmbed").replace(
        ", landscape_only=False", ""
    )
    config = MASt3RConfig.from_constructor_string(training)
    assert config == MASt3RConfig.official()
    assert config.patch_embed_cls == "PatchEmbedDust3R" and config.landscape_only is False


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("__import__('os').system('true')", "single call AsymmetricMASt3R"),
        (OFFICIAL_CONSTRUCTOR.replace("enc_depth=24", "enc_depth=__import__('os')"), "not a literal"),
        (OFFICIAL_CONSTRUCTOR.replace("enc_depth=24", "enc_depth=os.sep"), "not a literal"),
        (OFFICIAL_CONSTRUCTOR[:-1], "syntax"),
        (OFFICIAL_CONSTRUCTOR.replace("AsymmetricMASt3R(", "AsymmetricCroCo3DStereo("), "AsymmetricMASt3R"),
        (OFFICIAL_CONSTRUCTOR.replace("catmlp+dpt", "dpt"), "head_type"),
        (OFFICIAL_CONSTRUCTOR.replace("RoPE100", "cosine"), "pos_embed"),
        (OFFICIAL_CONSTRUCTOR.replace("pts3d+desc24", "pts3d"), "output_mode"),
        (OFFICIAL_CONSTRUCTOR.replace("PatchEmbedDust3R", "PatchEmbed"), "patch_embed_cls"),
        (OFFICIAL_CONSTRUCTOR.replace("enc_num_heads=16", "enc_num_heads=7"), "head dim"),
        (OFFICIAL_CONSTRUCTOR.replace("enc_depth=24", "enc_depth=24, enc_depth=2"), "twice"),
        ("AsymmetricMASt3R(1)", "positional"),
    ],
)
def test_bad_constructor_strings(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        MASt3RConfig.from_constructor_string(text)


def test_missing_keywords_use_upstream_defaults() -> None:
    # AsymmetricMASt3R's own defaults: two_confs=False, pos_embed='cosine' (unsupported) ...
    with pytest.raises(UsageError, match="pos_embed 'cosine'"):
        MASt3RConfig.from_constructor_kwargs({"head_type": "catmlp+dpt", "output_mode": "pts3d+desc24"})
    config = MASt3RConfig.from_constructor_kwargs(
        {"head_type": "catmlp+dpt", "output_mode": "pts3d+desc16", "pos_embed": "RoPE100", "freeze": "none"}
    )
    assert (config.enc_embed_dim, config.dec_depth, config.two_confs) == (768, 8, False)
    assert config.local_feat_dim == 16


def test_bad_config_values() -> None:
    with pytest.raises(UsageError, match="dpt_hooks"):
        _tiny_config(dpt_hooks=(1, 2, 2, 2))
    with pytest.raises(UsageError, match="depth_mode"):
        _tiny_config(depth_mode=("exp", 0.0, 10.0))
    with pytest.raises(UsageError, match="unknown fields"):
        MASt3RConfig.from_dict({"enc_width": 3})


@pytest.mark.slow
def test_full_size_random_weights_are_finite() -> None:
    """The official-size model (688M parameters) with random weights gives finite outputs (~25 s, 2 cores)."""
    model, _, config = build_mast3r(None, random_seed=0)
    assert config == MASt3RConfig.official()
    generator = torch.Generator().manual_seed(0)
    img1 = torch.rand(1, 3, 64, 96, generator=generator) * 2 - 1
    img2 = torch.rand(1, 3, 96, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        out = model(img1, img2)
    assert out["view1_desc"].shape == (1, 64, 96, 24)
    for name in OUTPUT_NAMES:
        assert torch.isfinite(out[name]).all(), name
