"""sdrun.bundle.specialise on small hand-made graphs: what is folded, batch broadcasting, another
prompt put in, and the graphs it refuses (a prompt-only value that depends on the batch)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrun.bundle.specialise import SpecialiseError, respecialise, specialise

VOCAB, WIDTH = 20, 4


def _graph(extra_nodes=(), extra_outputs=()):
    """y[b] = (x[b] @ W + 4 * mean_t(E[ids[b, t]])) * T, with x the "pixel_values" input
    (specialise takes the batch from it), T = Shape(ids)[1] (a prompt-only value without
    batch axis) and 4 = 2 * 2, a constant-only node only the prompt's side uses."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, WIDTH)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((3, WIDTH)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"]),                 # [B, T, W]
        helper.make_node("Mul", ["two", "two"], ["four"]),                  # constant only
        helper.make_node("ReduceMean", ["emb", "axes1"], ["text"], keepdims=0),  # [B, W]
        helper.make_node("Mul", ["text", "four"], ["text4"]),
        helper.make_node("Shape", ["ids"], ["n_tok"], start=1, end=2),
        helper.make_node("Cast", ["n_tok"], ["n_tok_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["pixel_values", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "text4"], ["sum"]),
        helper.make_node("Mul", ["sum", "n_tok_f"], ["y"]),
        *extra_nodes,
    ]
    g = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", WIDTH]), *extra_outputs],
        inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def _run(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "generic.onnx"
    onnx.save(_graph(), str(path))
    return path


def test_specialised_graph_matches_generic_at_any_batch(toy, tmp_path):
    ids = np.array([[3, 5, 7, 1]], np.int64)
    out, text = tmp_path / "model.onnx", tmp_path / "text.onnx"
    info = specialise(toy, out, text, {"ids": ids})
    assert info["boundary"] == {"text4": 0, "n_tok_f": None}
    assert info["nodes_removed"] == 5  # Gather, ReduceMean, Mul, Shape, Cast
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["pixel_values"]
    assert {t.name for t in m.graph.initializer} >= {"W", "text4__prompt", "n_tok_f"}
    assert "E" not in {t.name for t in m.graph.initializer}  # the prompt's weights moved out
    assert "four" not in {o for n in m.graph.node for o in n.output}  # dead constants pruned
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3)).astype(np.float32)
        want = _run(toy, {"pixel_values": x, "ids": np.repeat(ids, batch, 0)})[0]
        got = _run(out, {"pixel_values": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_respecialise_puts_another_prompt_in(toy, tmp_path):
    out, text = tmp_path / "model.onnx", tmp_path / "text.onnx"
    specialise(toy, out, text, {"ids": np.array([[3, 5, 7, 1]], np.int64)})
    other_ids = np.array([[9, 2]], np.int64)
    other = tmp_path / "other.onnx"
    shapes = respecialise(out, text, other, {"ids": other_ids})
    assert shapes == {"text4": [1, WIDTH], "n_tok_f": [1]}
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    want = _run(toy, {"pixel_values": x, "ids": np.repeat(other_ids, 2, 0)})[0]
    np.testing.assert_allclose(_run(other, {"pixel_values": x})[0], want, rtol=1e-6, atol=1e-6)


def test_a_batch_axis_of_blocks_is_tiled(tmp_path):
    """A prompt-only tensor laid out (batch*heads, ...) has 2 rows at batch 1 and 4 at
    batch 2 (attention masks repeated per head): the specialised graph tiles the rows."""
    extra = [helper.make_node("Concat", ["text4", "text4"], ["per_head"], axis=1),
             helper.make_node("Reshape", ["per_head", "rows_shape"], ["rows"]),  # [2B, W]
             helper.make_node("Concat", ["xw", "xw"], ["xw_per_head"], axis=1),
             helper.make_node("Reshape", ["xw_per_head", "rows_shape"], ["xw_rows"]),
             helper.make_node("Add", ["rows", "xw_rows"], ["z"])]
    out_info = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["R", WIDTH])]
    m = _graph(extra, out_info)
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, WIDTH], np.int64),
                                                       "rows_shape"))
    path, out = tmp_path / "generic.onnx", tmp_path / "model.onnx"
    onnx.save(m, str(path))
    ids = np.array([[4, 2, 2]], np.int64)
    info = specialise(path, out, tmp_path / "text.onnx", {"ids": ids})
    assert info["boundary"]["rows"] == 0
    x = np.random.default_rng(3).standard_normal((3, 3)).astype(np.float32)
    want = _run(path, {"pixel_values": x, "ids": np.repeat(ids, 3, 0)})
    got = _run(out, {"pixel_values": x})
    assert got[1].shape == (6, WIDTH)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_a_shape_read_that_holds_the_batch_size_stays_at_run_time(tmp_path):
    """Shape(ids)[0] is computed from the prompt input alone but is the batch size: frozen,
    it would break every other batch. The Shape op stays a run-time node, reading the
    (tiled) prompt input."""
    extra = [helper.make_node("Shape", ["ids"], ["n_batch"], start=0, end=1)]
    out_info = [helper.make_tensor_value_info("n_batch", TensorProto.INT64, [1])]
    path, out = tmp_path / "generic.onnx", tmp_path / "m.onnx"
    onnx.save(_graph(extra, out_info), str(path))
    info = specialise(path, out, tmp_path / "t.onnx", {"ids": np.array([[1, 2]], np.int64)})
    assert info["shape_ops_kept"] == 1 and "ids" in info["boundary"]
    x = np.zeros((3, 3), np.float32)
    assert _run(out, {"pixel_values": x})[1].tolist() == [3]


def test_a_prompt_value_summed_over_the_batch_is_refused(tmp_path):
    """A prompt-only value that is not a shape read and still changes with the batch (a sum
    over the batch axis) cannot be folded: specialise stops and names the tensor."""
    extra = [helper.make_node("ReduceSum", ["text4", "axes0"], ["over_batch"], keepdims=0),
             helper.make_node("Add", ["xw", "over_batch"], ["y3"])]
    out_info = [helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["B", WIDTH])]
    m = _graph(extra, out_info)
    m.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    path = tmp_path / "generic.onnx"
    onnx.save(m, str(path))
    with pytest.raises(SpecialiseError, match="over_batch: its value depends on the batch size"):
        specialise(path, tmp_path / "m.onnx", tmp_path / "t.onnx",
                   {"ids": np.array([[1, 2]], np.int64)})


def test_unknown_prompt_input_is_named(toy, tmp_path):
    with pytest.raises(SpecialiseError, match="no input.*input_ids"):
        specialise(toy, tmp_path / "m.onnx", tmp_path / "t.onnx",
                   {"input_ids": np.array([[1]], np.int64)})


def _masked_graph():
    """y2 = masked_fill(x @ W, any(ids == 0), -1): a prompt with padding (id 0) masks rows."""
    extra = [
        helper.make_node("Equal", ["ids", "zero"], ["is_pad"]),
        helper.make_node("Cast", ["is_pad"], ["is_pad_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["is_pad_f", "axes1"], ["any_pad_f"], keepdims=1),
        helper.make_node("Cast", ["any_pad_f"], ["mask"], to=TensorProto.BOOL),
        helper.make_node("Where", ["mask", "fill", "xw"], ["y2"]),
    ]
    m = _graph(extra, [helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["B", WIDTH])])
    m.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "zero"),
                                numpy_helper.from_array(np.array(-1.0, np.float32), "fill")])
    return m


def test_where_on_a_uniform_prompt_mask_is_dropped_and_guarded(tmp_path):
    """masked_fill with a prompt mask that is all False becomes an Identity; putting in a
    prompt whose mask is not all False again is refused, since the Where is gone."""
    path, out, text = tmp_path / "generic.onnx", tmp_path / "model.onnx", tmp_path / "text.onnx"
    onnx.save(_masked_graph(), str(path))
    ids = np.array([[3, 5, 7]], np.int64)
    info = specialise(path, out, text, {"ids": ids})
    assert info["where_removed"] == 1
    assert "Where" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    x = np.random.default_rng(4).standard_normal((2, 3)).astype(np.float32)
    want = _run(path, {"pixel_values": x, "ids": np.repeat(ids, 2, 0)})
    for g, w in zip(_run(out, {"pixel_values": x}), want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # another prompt without padding: fine; with padding: refused
    respecialise(out, text, tmp_path / "other.onnx", {"ids": np.array([[9, 9]], np.int64)})
    with pytest.raises(SpecialiseError, match="mask: the graph was specialised to a mask that is all False"):
        respecialise(out, text, tmp_path / "padded.onnx", {"ids": np.array([[9, 0]], np.int64)})
