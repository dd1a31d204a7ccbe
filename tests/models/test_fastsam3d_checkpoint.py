"""FastSAM3D checkpoint loading: the released training container, safetensors, and strict key checks."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export_engine.errors import CheckpointError
from export_engine.models.fastsam3d import FastSAM3DConfig, build_fastsam3d


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: with 2 OpenMP threads on a loaded 2-core box every op pays ~10 ms of barrier waits
    (measured: a tiny decode 1 s vs 4 ms single-threaded). Results differ by < 1e-5 across thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ENCODER_PREFIX = "image_encoder."


@pytest.fixture(scope="module")
def small_config(fastsam3d_ref: Path) -> FastSAM3DConfig:
    return FastSAM3DConfig.from_json(json.loads((fastsam3d_ref / "config.json").read_text()))


@pytest.fixture(scope="module")
def ref_state(fastsam3d_ref: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fastsam3d_ref / "state_dict.safetensors"))


def training_extras() -> dict[str, object]:
    """What FastSAM3D:train.py save_checkpoint writes next to the weights (plausible values)."""
    params = [
        torch.nn.Parameter(torch.randn(8, 4)),
        torch.nn.Parameter(torch.randn(4)),
        torch.nn.Parameter(torch.randn(3)),
    ]
    optimizer = torch.optim.AdamW(
        [{"params": params[:1]}, {"params": params[1:2], "lr": 8e-5}, {"params": params[2:], "lr": 8e-5}],
        lr=8e-4,
        betas=(0.9, 0.999),
        weight_decay=0.1,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [60, 90], 0.1)  # milestones: a Counter
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    args = argparse.Namespace(
        task_name="union_train",
        model_type="vit_b_ori",
        checkpoint="work_dir/SAM/sam_med3d_oringin.pth",
        device=torch.device("cpu"),  # train.py replaces the string with a torch.device
        gpu_ids=[0, 1],
        step_size=[60, 90],
        lr=8e-4,
        multi_gpu=False,
        rank=-1,
    )
    return {
        "epoch": 100,
        "optimizer_state_dict": optimizer.state_dict(),
        "lr_scheduler_state_dict": scheduler.state_dict(),
        "losses": [0.91, 0.52, 0.31],
        "dices": [0, 0, 0],
        "best_loss": 0.31,
        "best_dice": 0.0,
        "args": args,
        "used_datas": [
            "data/medical_preprocessed/adrenal/ct_WORD",
            "data/medical_preprocessed/liver/ct_LiTS",
        ],
    }


def assert_weights_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_released_style_training_container(
    tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "FastSAM3D.pth"
    torch.save({"model_state_dict": ref_state, **training_extras()}, path)
    model, ckpt, config = build_fastsam3d(small_config, checkpoint=str(path))
    assert config == small_config and ckpt is not None and not model.training
    assert_weights_equal(model, ref_state)
    assert ckpt.meta["args"]["model_type"] == "vit_b_ori"
    assert len(ckpt.sha256) == 64


def test_safetensors(tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "fastsam3d.safetensors"
    save_file(ref_state, str(path))
    model, ckpt, _ = build_fastsam3d(small_config, checkpoint=str(path), attn_impl="sdpa")
    assert ckpt is not None and ckpt.source == str(path)
    assert_weights_equal(model, ref_state)


def test_ddp_prefix_is_stripped(
    tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in ref_state.items()}}, path)
    model, _, _ = build_fastsam3d(small_config, checkpoint=str(path))
    assert_weights_equal(model, ref_state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(
    tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor], suffix: str
) -> None:
    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save({"model_state_dict": ref_state}, full)
    else:
        save_file(ref_state, str(full))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_fastsam3d(small_config, checkpoint=str(cut))


def test_weights_of_another_model(tmp_path: Path, small_config: FastSAM3DConfig) -> None:
    path = tmp_path / "other.pth"
    other = {"enc.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "dec.head.weight": torch.zeros(2, 2)}
    torch.save({"model": other}, path)
    with pytest.raises(CheckpointError, match="another model"):
        build_fastsam3d(small_config, checkpoint=str(path))


def test_misshaped_tensors(tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "small.safetensors"
    save_file(ref_state, str(path))
    wider_iou_head = FastSAM3DConfig.from_json({**small_config.to_dict(), "iou_head_hidden_dim": 32})
    with pytest.raises(CheckpointError, match=r"wrong shape .*iou_prediction_head"):
        build_fastsam3d(wider_iou_head, checkpoint=str(path))


def test_missing_pe_buffer(tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "no_pe.pth"
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    torch.save({"model_state_dict": {k: v for k, v in ref_state.items() if k != key}}, path)
    with pytest.raises(CheckpointError, match="positional_encoding_gaussian_matrix"):
        build_fastsam3d(small_config, checkpoint=str(path))


def test_released_config_rejects_small_weights(tmp_path: Path, ref_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "small.safetensors"
    save_file(ref_state, str(path))
    with pytest.raises(CheckpointError, match="FastSAM3D checkpoint"):
        build_fastsam3d(None, checkpoint=str(path))


def test_encoder_only_student_file(
    tmp_path: Path, small_config: FastSAM3DConfig, ref_state: dict[str, torch.Tensor]
) -> None:
    encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in ref_state.items() if k.startswith(ENCODER_PREFIX)}
    path = tmp_path / "6layers6heads_student.pth"
    torch.save({"epoch": 1, "model_state_dict": encoder, "losses": [0.1]}, path)
    with pytest.raises(CheckpointError, match="encoder-only"):
        build_fastsam3d(small_config, checkpoint=str(path))


def test_missing_file(small_config: FastSAM3DConfig, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_fastsam3d(small_config, checkpoint=str(tmp_path / "absent.pth"))
