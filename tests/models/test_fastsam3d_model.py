"""FastSAM3D module behaviour on a tiny random model: key layout, batching, labels, export-friendliness."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from export_engine.errors import ModelInputError, UsageError
from export_engine.models.fastsam3d import (
    FastSAM3D,
    FastSAM3DConfig,
    build_fastsam3d,
    expected_state_dict_shapes,
    init_random_weights,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: with 2 OpenMP threads on a loaded 2-core box every op pays ~10 ms of barrier waits
    (measured: a tiny decode 1 s vs 4 ms single-threaded). Results differ by < 1e-5 across thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = FastSAM3DConfig(
    img_size=32,
    patch_size=8,
    encoder_embed_dim=48,
    encoder_depth=3,
    encoder_num_heads=2,
    skip_layer=1,
    prompt_embed_dim=48,
    mask_in_chans=8,
    iou_head_hidden_dim=16,
    decoder_mlp_dim=64,
    decoder_num_heads=4,
)


@pytest.fixture(scope="module")
def tiny() -> FastSAM3D:
    model = FastSAM3D(TINY).eval()
    init_random_weights(model, seed=0)
    return model


@pytest.fixture(scope="module")
def tiny_embedding(tiny: FastSAM3D) -> torch.Tensor:
    with torch.no_grad():
        return tiny.encode(torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)))


def prompts(batch: int, n: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 32, (batch, n, 3), generator=gen).float()
    labels = torch.randint(-1, 2, (batch, n), generator=gen)
    mask = torch.randn(batch, 1, 16, 16, 16, generator=gen) * 3
    return coords, labels, mask


# ------------------------------------------------------------------------------------------ key layout


def test_expected_shapes_equal_state_dict_full_json(fastsam3d_ref: Path) -> None:
    data = json.loads((fastsam3d_ref / "state_dict_full.json").read_text())
    shapes = expected_state_dict_shapes(FastSAM3DConfig.released())
    assert len(shapes) == data["num_entries"] == 216
    assert list(shapes.items()) == [(e["key"], tuple(e["shape"])) for e in data["keys"]]
    counts = {
        prefix: sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(prefix + "."))
        for prefix in ("image_encoder", "prompt_encoder", "mask_decoder")
    }
    counts["total"] = sum(counts.values())
    assert counts == data["param_counts"]


def test_state_dict_layout_of_a_built_model(tiny: FastSAM3D) -> None:
    state = tiny.state_dict()
    assert list(state) == list(expected_state_dict_shapes(TINY))
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in state  # persistent buffer
    # build_fastsam3d materialises models from the meta device uninitialised: this only works while every
    # tensor of the model is in its state dict (no non-persistent buffers).
    assert len(state) == len(list(tiny.parameters())) + len(list(tiny.buffers()))
    learnable_prompt = sum(p.numel() for p in tiny.prompt_encoder.parameters())
    assert learnable_prompt == sum(t.numel() for k, t in state.items() if k.startswith("prompt_encoder.")) - 3 * 16


def test_released_learnable_prompt_encoder_params() -> None:
    with torch.device("meta"):
        model = FastSAM3D(FastSAM3DConfig.released())
    assert sum(p.numel() for p in model.prompt_encoder.parameters()) == 8668
    assert sum(p.numel() for p in model.parameters()) == 53224624 - 384


# ------------------------------------------------------------------------------------------ behaviour


def test_sdpa_equals_explicit(tiny: FastSAM3D, tiny_embedding: torch.Tensor) -> None:
    sdpa = FastSAM3D(TINY, attn_impl="sdpa").eval()
    sdpa.load_state_dict(tiny.state_dict())
    image = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    coords, labels, mask = prompts(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(sdpa.encode(image), tiny_embedding, atol=1e-5, rtol=1e-5)
        a = tiny.prompt_decode_all(tiny_embedding, coords, labels, mask)
        b = sdpa.prompt_decode_all(tiny_embedding, coords, labels, mask)
    torch.testing.assert_close(b.low_res_masks_all, a.low_res_masks_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.iou_predictions_all, a.iou_predictions_all, atol=1e-5, rtol=1e-5)


def test_prompt_batch_larger_than_image_batch(tiny: FastSAM3D, tiny_embedding: torch.Tensor) -> None:
    coords, labels, mask = prompts(3, 4)
    with torch.no_grad():
        masks, iou = tiny.prompt_decode(tiny_embedding, coords, labels, mask, multimask_output=True)
        assert masks.shape == (3, 3, 16, 16, 16) and iou.shape == (3, 3)
        for i in range(3):
            one, one_iou = tiny.prompt_decode(
                tiny_embedding, coords[i : i + 1], labels[i : i + 1], mask[i : i + 1], multimask_output=True
            )
            torch.testing.assert_close(masks[i : i + 1], one, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[i : i + 1], one_iou, atol=1e-5, rtol=1e-5)
        # An embedding batch equal to the prompt batch is used as is.
        same, _ = tiny.prompt_decode(tiny_embedding.expand(3, -1, -1, -1, -1), coords, labels, mask, True)
    torch.testing.assert_close(same, masks, atol=0, rtol=0)


def test_label_arithmetic_equals_boolean_assignment(tiny: FastSAM3D) -> None:
    """The export-friendly label handling equals upstream's boolean-mask assignment."""
    pe = tiny.prompt_encoder
    coords = torch.tensor([[[3.0, 4.0, 5.0], [10.0, 0.0, 31.0], [7.0, 7.0, 7.0], [1.0, 2.0, 3.0]]])
    labels = torch.tensor([[1, 0, -1, 2]])  # 2: any other value gets the positional encoding only
    with torch.no_grad():
        got = pe.embed_points(coords, labels)
        pts = torch.cat([coords + 0.5, torch.zeros(1, 1, 3)], dim=1)
        lab = torch.cat([labels, torch.full((1, 1), -1)], dim=1)
        want = pe.pe_layer.encode(pts / TINY.img_size)
        want[lab == -1] = 0.0
        want[lab == -1] += pe.not_a_point_embed.weight
        want[lab == 0] += pe.point_embeddings[0].weight
        want[lab == 1] += pe.point_embeddings[1].weight
        float_labels = pe.embed_points(coords, labels.float())
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(float_labels, want, atol=0, rtol=0)


def test_has_mask_input_blend(tiny: FastSAM3D) -> None:
    coords, labels, mask = prompts(2, 2)
    pe = tiny.prompt_encoder
    with torch.no_grad():
        _, with_mask = pe(coords, labels, mask)
        _, without = pe(coords, labels, None)
        _, blended = pe(coords, labels, mask, has_mask_input=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(blended[0], with_mask[0], atol=0, rtol=0)
    torch.testing.assert_close(blended[1], without[1], atol=0, rtol=0)


def test_upscale_masks_is_trilinear_half_pixel(tiny: FastSAM3D) -> None:
    low = torch.randn(2, 1, 16, 16, 16)
    up = tiny.upscale_masks(low, 32)
    assert up.shape == (2, 1, 32, 32, 32)
    torch.testing.assert_close(up, F.interpolate(low, size=(32, 32, 32), mode="trilinear", align_corners=False))


def test_bad_inputs_raise_model_input_error(tiny: FastSAM3D, tiny_embedding: torch.Tensor) -> None:
    coords, labels, mask = prompts(2, 3)
    with pytest.raises(ModelInputError, match="crop or pad"):
        tiny.encode(torch.zeros(1, 1, 32, 32, 16))
    with pytest.raises(ModelInputError, match="point_labels"):
        tiny.prompt_decode(tiny_embedding, coords, labels[:, :2], mask)
    with pytest.raises(ModelInputError, match="mask_input"):
        tiny.prompt_decode(tiny_embedding, coords, labels, mask[:, :, :8])
    with pytest.raises(ModelInputError, match="neither 1 nor"):
        tiny.prompt_decode(tiny_embedding.expand(3, -1, -1, -1, -1), coords, labels, mask)
    with pytest.raises(ModelInputError, match="N>=1"):
        tiny.prompt_decode(tiny_embedding, coords[:, :0], labels[:, :0], mask)


def test_unknown_attn_impl_and_seed_checkpoint_choice() -> None:
    with pytest.raises(UsageError, match="explicit, sdpa"):
        FastSAM3D(TINY, attn_impl="flash")
    with pytest.raises(UsageError, match="exactly one"):
        build_fastsam3d(TINY)
    with pytest.raises(UsageError, match="exactly one"):
        build_fastsam3d(TINY, checkpoint="x.pth", random_seed=0)


# ------------------------------------------------------------------------------------ export-friendliness


class _TorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.bool_index = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", str(func))
        self.names.add(name)
        if name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in tree_leaves(args[1:])
        ):
            self.bool_index = True
        return func(*args, **(kwargs or {}))


class _EmptyTensors(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.empty: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.empty += [str(func) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.numel() == 0]
        return out


@pytest.mark.parametrize("with_mask", [True, False])
def test_forward_is_export_friendly(tiny: FastSAM3D, with_mask: bool) -> None:
    coords, labels, mask = prompts(2, 3)
    inputs = (coords.clone(), labels.clone(), mask.clone())
    with torch.no_grad(), _TorchCalls() as calls, _EmptyTensors() as empties:
        embedding = tiny.encode(torch.randn(1, 1, 32, 32, 32))
        tiny.prompt_decode(embedding, coords, labels, mask if with_mask else None)
    forbidden = {
        "einsum",
        "nonzero",
        "argwhere",
        "masked_select",
        "masked_scatter",
        "index_put",
        "index_put_",
        "repeat_interleave",
        "__setitem__",
        "item",
        "tolist",
    }
    assert not calls.names & forbidden, calls.names & forbidden
    assert not [n for n in calls.names if n.endswith("_") and not n.startswith("__")]  # no in-place ops
    assert not calls.bool_index
    assert not empties.empty
    for before, after in zip(inputs, (coords, labels, mask), strict=True):
        torch.testing.assert_close(after, before, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ random weights


def test_init_random_weights_is_deterministic() -> None:
    a, b, c = (FastSAM3D(TINY) for _ in range(3))
    init_random_weights(a, 7)
    init_random_weights(b, 7)
    init_random_weights(c, 8)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
        assert torch.isfinite(x).all(), name
        assert not torch.equal(x, z), name
    ln = a.image_encoder.blocks[0].norm2.weight.detach()
    assert 0.5 <= float(ln.min()) and float(ln.max()) <= 1.5


def test_full_size_random_build_is_fast_and_scaled() -> None:
    start = time.perf_counter()
    model, ckpt, config = build_fastsam3d(random_seed=0)
    elapsed = time.perf_counter() - start
    assert ckpt is None and config == FastSAM3DConfig.released() and not model.training
    assert elapsed < 20, f"building the 53M-parameter model took {elapsed:.1f}s"
    qkv = model.image_encoder.blocks[2].attn.qkv.weight.detach()
    assert abs(float(qkv.std()) * 768**0.5 - 1) < 0.01  # N(0, 1/fan_in)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.slow
def test_full_size_random_model_gives_non_trivial_outputs() -> None:
    model, ckpt, config = build_fastsam3d(random_seed=0)
    assert ckpt is None and config == FastSAM3DConfig.released() and not model.training
    with torch.no_grad():
        embedding = model.encode(torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0)))
        masks, iou = model.prompt_decode(
            embedding,
            torch.tensor([[[64.0, 40.0, 70.0]]]),
            torch.tensor([[1]]),
            torch.zeros(1, 1, 32, 32, 32),
        )
    assert embedding.shape == (1, 384, 8, 8, 8) and masks.shape == (1, 1, 32, 32, 32) and iou.shape == (1, 1)
    assert torch.isfinite(embedding).all() and torch.isfinite(masks).all()
    assert 0.1 < float(embedding.std()) < 10 and 0.1 < float(masks.std()) < 100
    assert 0.02 < float((masks > 0).float().mean()) < 0.98  # both signs: a mask edge exists
