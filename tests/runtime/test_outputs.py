"""Loading an artifact to compute only some outputs of a graph: the same values, the others never computed, and
clear refusals (the CPU path; the CUDA runner's is a gpu test in tests/runners/test_ort_cuda.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export_engine.errors import ModelInputError, UsageError
from export_engine.families.mast3r.match import Matcher
from export_engine.runners.ort_lowering import lowered_graph
from export_engine.runtime.session import load
from export_engine.sfm.executor import DECODER_OUTPUTS, load_for_matching


def reference_feed(artifact: Path, graph: str) -> dict[str, np.ndarray]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    check = next(g for g in manifest["graphs"] if g["name"] == graph)["reference_check"]
    with np.load(artifact / check["inputs"]) as data:
        return {k: data[k] for k in data.files}


def test_a_pruned_decoder_gives_the_same_descriptors_and_nothing_else(tiny_mast3r_artifact: Path) -> None:
    feed = reference_feed(tiny_mast3r_artifact, "decoder")
    with load(tiny_mast3r_artifact) as full, load_for_matching(tiny_mast3r_artifact) as pruned:
        assert set(pruned.outputs) == {"decoder"} and sorted(pruned.outputs["decoder"]) == sorted(DECODER_OUTPUTS)
        everything, kept = full.runners["decoder"](feed), pruned.runners["decoder"](feed)
        assert sorted(kept) == sorted(DECODER_OUTPUTS) and set(everything) > set(kept)
        for name in DECODER_OUTPUTS:
            np.testing.assert_allclose(kept[name], everything[name], rtol=1e-5, atol=1e-6, err_msg=name)
        stored = full.path / "decoder.onnx"
        source = lowered_graph(stored, (), DECODER_OUTPUTS)
        assert source != stored and source.stat().st_size < stored.stat().st_size
        with pytest.raises(UsageError, match=r"compute only .*load it without outputs="):
            pruned.run({"view1_img": np.zeros(1), "view2_img": np.zeros(1)})
        with pytest.raises(UsageError, match=r"Matcher also returns the 3-D points: load it without outputs="):
            Matcher(pruned)


def test_unknown_graphs_and_outputs_are_refused_and_naming_all_prunes_nothing(tiny_mast3r_artifact: Path) -> None:
    with pytest.raises(ModelInputError, match=r"no graph 'decoderr'; its graphs: \['decoder', 'encoder'\]"):
        load(tiny_mast3r_artifact, outputs={"decoderr": ("view1_desc",)})
    with pytest.raises(ModelInputError, match=r"has no output\(s\) \['view1_dsc'\]; its outputs: \['view1_pts3d'"):
        load(tiny_mast3r_artifact, outputs={"decoder": ("view1_desc", "view1_dsc")})
    for bad in ((), "view1_desc"):
        with pytest.raises(ModelInputError, match="outputs= takes a non-empty list of output names"):
            load(tiny_mast3r_artifact, outputs={"decoder": bad})
    with pytest.raises(ModelInputError, match=r"decoder.onnx has no output\(s\) \['x'\]; its outputs"):
        lowered_graph(tiny_mast3r_artifact / "decoder.onnx", (), ("x",))
    manifest = json.loads((tiny_mast3r_artifact / "manifest.json").read_text())
    every = [o["name"] for o in next(g for g in manifest["graphs"] if g["name"] == "decoder")["outputs"]]
    with load(tiny_mast3r_artifact, outputs={"decoder": every}) as session:
        assert session.outputs == {}
        images = np.zeros((1, 3, 64, 96), np.float32)
        out = session.run({"view1_img": images, "view2_img": images})
        assert "view1_pts3d" in out


def test_a_pruned_rewritten_graph_is_checked_on_what_it_keeps(tiny_mast3r_artifact: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    from export_engine.runtime.session import ort_cpu_runner

    manifest = json.loads((tiny_mast3r_artifact / "manifest.json").read_text())
    graph = next(g for g in manifest["graphs"] if g["name"] == "decoder")
    check = graph["reference_check"]
    with caplog.at_level("INFO", logger="export_engine"):
        runner = ort_cpu_runner(tiny_mast3r_artifact / "decoder.onnx", graph, ("skip_layernorm", "bias_gelu"),
                                outputs=("view2_desc",))  # fmt: skip
    assert "pass the artifact's check (view2_desc max abs error" in caplog.text
    got = runner(reference_feed(tiny_mast3r_artifact, "decoder"))
    assert list(got) == ["view2_desc"]
    with np.load(tiny_mast3r_artifact / check["expected"]) as data:
        tol = check["tolerances"]["view2_desc"]
        np.testing.assert_allclose(got["view2_desc"], data["view2_desc"], atol=tol["atol"], rtol=tol["rtol"])


def test_pruned_and_whole_copies_of_one_graph_are_kept_apart(tiny_mast3r_artifact: Path) -> None:
    import onnx

    stored = tiny_mast3r_artifact / "decoder.onnx"
    names = ("skip_layernorm",)
    whole, pruned = lowered_graph(stored, names), lowered_graph(stored, names, ("view1_desc",))
    longer = lowered_graph(stored, (*names, "bias_gelu"), ("view1_desc",))  # started from the pruned copy
    assert len({whole, pruned, longer, stored}) == 4
    outputs = {p: [o.name for o in onnx.load(str(p), load_external_data=False).graph.output]
               for p in (whole, pruned, longer)}  # fmt: skip
    assert len(outputs[whole]) == 8 and outputs[pruned] == outputs[longer] == ["view1_desc"]
    assert lowered_graph(stored, names, ("view1_desc",)) == pruned and lowered_graph(stored, names) == whole
