"""Loading MASt3R weights from every supported container, and refusing the wrong ones."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export_engine.errors import CheckpointError, UsageError
from export_engine.models.mast3r import (
    ALIASES,
    OUTPUT_NAMES,
    MASt3R,
    MASt3RConfig,
    build_mast3r,
    count_parameters,
    expected_state_dict_shapes,
)


@dataclass
class NotAllowListed:
    """A picklable class that weights_only loading must refuse."""

    value: int = 1


@pytest.fixture(scope="module")
def ref_json(mast3r_ref: Path) -> dict:
    return json.loads((mast3r_ref / "config.json").read_text())


@pytest.fixture(scope="module")
def small_config(ref_json: dict) -> MASt3RConfig:
    return MASt3RConfig.from_json(ref_json)


@pytest.fixture(scope="module")
def ref_state_dict(mast3r_ref: Path) -> dict[str, torch.Tensor]:
    return load_file(str(mast3r_ref / "model.safetensors"))


@pytest.fixture(scope="module")
def ref_outputs(mast3r_ref: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(mast3r_ref / "inputs.npz") as inputs, np.load(mast3r_ref / "outputs.npz") as outputs:
        return {k: inputs[k] for k in inputs.files}, {k: outputs[k] for k in outputs.files}


def _check_outputs(model: MASt3R, ref_outputs: tuple[dict, dict]) -> None:
    inputs, expected = ref_outputs
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["view1_img"]), torch.from_numpy(inputs["view2_img"]))
    for name in OUTPUT_NAMES:
        assert np.allclose(out[name].numpy(), expected[name], rtol=1e-4, atol=1e-4), name


def _training_string(ref_json: dict) -> str:
    # What a training run stores in args.model (README section 2): ManyAR_PatchEmbed, no landscape_only.
    text = ref_json["constructor_string"].replace("PatchEmbedDust3R", "ManyAR_PatchEmbed")
    return text.replace(", landscape_only=False", "")


def _without_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k not in ALIASES}


# ----------------------------------------------------------------------------------------------------------
# Official key set


def test_official_keys_and_shapes(mast3r_ref: Path) -> None:
    full = json.loads((mast3r_ref / "state_dict_full.json").read_text())
    expected = [(entry["key"], tuple(entry["shape"])) for entry in full["keys"]]
    ours = expected_state_dict_shapes(MASt3RConfig.official())
    assert len(ours) == len(expected) == 1017
    assert list(ours.items()) == expected  # same names, shapes and order
    assert count_parameters(MASt3RConfig.official()) == full["n_params_unique"] == 688_638_856
    assert full["aliases"] == ALIASES
    assert set(full["unused_in_forward"]) <= set(ours)


def test_official_aliases_share_modules() -> None:
    with torch.device("meta"):
        model = MASt3R(MASt3RConfig.official())
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, canonical in ALIASES.items():
        assert params[alias] is params[canonical]
    assert len(model.state_dict()) == 1017 and len(dict(model.named_parameters())) == 1009


# ----------------------------------------------------------------------------------------------------------
# Containers


def test_reference_safetensors_with_aliases(
    mast3r_ref: Path, small_config: MASt3RConfig, ref_outputs: tuple[dict, dict]
) -> None:
    model, ckpt, config = build_mast3r(small_config, str(mast3r_ref / "model.safetensors"))
    assert ckpt is not None and len(ckpt.sha256) == 64 and config == small_config
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    scratch = model.downstream_head2.dpt.scratch
    assert scratch.layer_rn[2] is scratch.layer3_rn
    _check_outputs(model, ref_outputs)


def test_safetensors_without_aliases(
    tmp_path: Path, small_config: MASt3RConfig, ref_state_dict: dict, ref_outputs: tuple[dict, dict]
) -> None:
    path = tmp_path / "mast3r.safetensors"
    save_file(_without_aliases(ref_state_dict), str(path))
    model, _, _ = build_mast3r(small_config, str(path))
    _check_outputs(model, ref_outputs)


def test_pth_training_container(
    tmp_path: Path, ref_json: dict, small_config: MASt3RConfig, ref_state_dict: dict, ref_outputs: tuple
) -> None:
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(model=_training_string(ref_json), lr=1e-4)
    torch.save({"model": ref_state_dict, "args": args, "epoch": 3}, path)
    model, ckpt, config = build_mast3r(None, str(path))  # config from args.model (+ DPT widths from shapes)
    assert ckpt is not None and ckpt.meta["args_model"] == args.model
    assert config == small_config
    _check_outputs(model, ref_outputs)


def test_hf_folder(tmp_path: Path, ref_json: dict, small_config: MASt3RConfig, ref_state_dict: dict) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(_without_aliases(ref_state_dict), str(folder / "model.safetensors"))
    kwargs = dict(ref_json["constructor_kwargs"])
    (folder / "config.json").write_text(json.dumps(kwargs))  # -Infinity / Infinity, as Python's json writes
    _, ckpt, config = build_mast3r(None, str(folder))
    assert ckpt is not None and "hf_config" in ckpt.meta
    assert config == small_config
    # An explicit "dpt" section is used as given (and here disagrees with the weights).
    (folder / "config.json").write_text(json.dumps({**kwargs, "dpt": {"feature_dim": 64}}))
    with pytest.raises(CheckpointError, match="wrong shape"):
        build_mast3r(None, str(folder))


def test_hf_repo_id_from_cache(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mast3r_ref: Path,
    ref_json: dict,
    small_config: MASt3RConfig,
    ref_outputs: tuple[dict, dict],
) -> None:
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    repo = cache / "models--naver--tiny-mast3r"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.copyfile(mast3r_ref / "model.safetensors", snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({**ref_json["constructor_kwargs"], "dpt": ref_json["dpt"]}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model, ckpt, config = build_mast3r(None, "naver/tiny-mast3r")
    assert ckpt is not None and ckpt.source == "hf:naver/tiny-mast3r"
    assert config == small_config
    _check_outputs(model, ref_outputs)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        build_mast3r(None, "naver/absent-model")


# ----------------------------------------------------------------------------------------------------------
# Refusals


def test_exactly_one_source(small_config: MASt3RConfig) -> None:
    with pytest.raises(UsageError, match="exactly one"):
        build_mast3r(small_config)
    with pytest.raises(UsageError, match="exactly one"):
        build_mast3r(small_config, "x.pth", random_seed=1)


def test_truncated_files(tmp_path: Path, mast3r_ref: Path, small_config: MASt3RConfig, ref_state_dict: dict) -> None:
    data = (mast3r_ref / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_mast3r(small_config, str(cut))
    pth = tmp_path / "full.pth"
    torch.save({"model": ref_state_dict}, pth)
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_mast3r(small_config, str(cut_pth))


def test_other_models_keys(tmp_path: Path, small_config: MASt3RConfig, ref_state_dict: dict) -> None:
    other = tmp_path / "fastsam3d.pth"
    torch.save(
        {
            "model": {
                "image_encoder.patch_embed.proj.weight": torch.zeros(8, 1, 4, 4, 4),
                "mask_decoder.transformer.layers.0.norm1.weight": torch.ones(8),
                "prompt_encoder.point_embeddings.0.weight": torch.zeros(1, 8),
            }
        },
        other,
    )
    with pytest.raises(CheckpointError, match="another model") as err:
        build_mast3r(small_config, str(other))
    assert "image_encoder.patch_embed.proj.weight" in str(err.value) and "mask_token" in str(err.value)

    renamed = dict(ref_state_dict)
    renamed["enc_blocks.0.attn.qkv_renamed.weight"] = renamed.pop("enc_blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    with pytest.raises(CheckpointError) as err:
        build_mast3r(small_config, str(path))
    assert "enc_blocks.0.attn.qkv.weight" in str(err.value)
    assert "enc_blocks.0.attn.qkv_renamed.weight" in str(err.value)


def test_misshaped(tmp_path: Path, small_config: MASt3RConfig, ref_state_dict: dict) -> None:
    bad = dict(ref_state_dict)
    bad["dec_norm.weight"] = torch.ones(65)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=r"dec_norm.weight \(65,\) != \(64,\)"):
        build_mast3r(small_config, str(path))
    # The official config against small weights: other depths, so other keys.
    with pytest.raises(CheckpointError, match="keys do not match: 636 missing"):
        build_mast3r(MASt3RConfig.official(), str(path))


def test_non_allow_listed_pickle(tmp_path: Path, ref_state_dict: dict) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": ref_state_dict, "args": NotAllowListed()}, path)
    with pytest.raises(CheckpointError, match="NotAllowListed"):
        build_mast3r(None, str(path))


def test_unusable_args_model(tmp_path: Path, ref_state_dict: dict) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": ref_state_dict, "args": argparse.Namespace(model="__import__('os')")}, path)
    with pytest.raises(CheckpointError, match="model description cannot be used"):
        build_mast3r(None, str(path))
