"""The model registry: a fifth model kind is one adapter, registered, and the pipeline runs
it beside the others without a line of `pipeline.py` changed."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from sdrun.bundle.bundle import Bundle
from sdrun.errors import BundleError
from sdrun.models import REGISTRY, Detections, Detector, register
from sdrun.pipeline import Pipeline

onnx = pytest.importorskip("onnx")

TOY_BOX = [0.1, 0.2, 0.5, 0.6]


def toy_detector_graph() -> bytes:
    """pixel_values [N,3,32,32] -> boxes [N,1,4] (TOY_BOX) and scores [N,1] (0.9 when the view
    is bright on average, else 0.6: the graph does read its input)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 3, 32, 32])
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 1, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])
    def const(name, values, shape):
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, shape, values))
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["mean"], axes=[1, 2, 3], keepdims=0),  # [N]
        helper.make_node("Unsqueeze", ["mean", "axis1"], ["mean1"]),  # [N,1]
        const("half", [0.5], []), const("lo", [0.6], []), const("step", [0.3], []),
        helper.make_node("Greater", ["mean1", "half"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["brightf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["brightf", "step"], ["bonus"]),
        helper.make_node("Add", ["bonus", "lo"], ["scores"]),
        helper.make_node("Unsqueeze", ["scores", "axis2"], ["scores3"]),  # [N,1,1]
        const("zero", [0.0], []), const("box", TOY_BOX, [1, 1, 4]),
        helper.make_node("Mul", ["scores3", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "box"], ["boxes"]),  # [N,1,4]
    ]
    axes = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("axis2", TensorProto.INT64, [1], [2])]
    model = helper.make_model(helper.make_graph(nodes, "toy", [x], [boxes, scores], initializer=axes),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def toy_registered():
    @register
    class ToyDetector(Detector):
        name = "toydet"
        graphs = ("detect",)
        score_param = "owlvit_score_thr"

        @classmethod
        def parse_spec(cls, bundle, entry):
            return bundle.vocabulary.index(entry["label"])

        def detect(self, views, params):
            import cv2

            x = np.stack([cv2.resize(v, (32, 32), interpolation=cv2.INTER_AREA) for v in views])
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
            o = self.graph.run({"pixel_values": x})
            keep = o["scores"] >= params[self.score_param]
            return [Detections(o["boxes"][k][keep[k]].astype(np.float64), o["scores"][k][keep[k]],
                               np.full(int(keep[k].sum()), self.spec, np.int64)) for k in range(len(views))]

    yield ToyDetector
    REGISTRY.pop("toydet", None)


def add_toy_model(src, dst, label: str):
    shutil.copytree(src, dst)
    data = toy_detector_graph()
    (dst / "toydet").mkdir()
    (dst / "toydet" / "detect.onnx").write_bytes(data)
    m = json.loads((dst / "manifest.json").read_text())
    models = dict(m["models"])
    models = {**{k: v for k, v in models.items() if k in ("owlvit", "gdino")},
              "toydet": {"label": label, "graphs": {"detect": {
                  "file": "toydet/detect.onnx",
                  "inputs": [{"name": "pixel_values", "shape": ["N", 3, 32, 32]}],
                  "outputs": [{"name": "boxes", "shape": ["N", 1, 4]}, {"name": "scores", "shape": ["N", 1]}]}}},
              **{k: v for k, v in models.items() if k not in ("owlvit", "gdino")}}
    m["models"] = models
    m["files"]["toydet/detect.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def test_a_fifth_model_kind_is_one_registered_adapter(tiny_bundle, tmp_path, toy_registered):
    label = Bundle.load(tiny_bundle).vocabulary[0]
    bundle = add_toy_model(tiny_bundle, tmp_path / "with-toy", label)
    pipe = Pipeline.load(bundle)
    assert [d.name for d in pipe.detectors] == ["owlvit", "gdino", "toydet"]
    rng = np.random.default_rng(0)
    a = np.full((96, 128, 3), 230, np.uint8)  # bright: the toy detector says 0.9
    b = rng.integers(0, 60, (96, 128, 3), dtype=np.uint8)  # dark: 0.6, below the threshold
    views = pipe.detectors[2].detect([a, b], {"owlvit_score_thr": 0.7})
    assert len(views[0].scores) == 1 and len(views[1].scores) == 0
    assert views[0].scores[0] == pytest.approx(0.9)
    out = pipe.model_outputs([("p", a, b)], embed="all")[0]
    toy_views = [name for name, _ in out.views if "/toydet/" in name]
    assert toy_views == ["1/toydet/plain", "1/toydet/flip", "2/toydet/plain", "2/toydet/flip"]
    plain = dict(out.views)["1/toydet/plain"]
    np.testing.assert_allclose(plain.boxes[0], TOY_BOX, atol=1e-6)
    flip = dict(out.views)["1/toydet/flip"]  # mirrored back to the image's frame
    np.testing.assert_allclose(flip.boxes[0], [1 - TOY_BOX[2], TOY_BOX[1], 1 - TOY_BOX[0], TOY_BOX[3]], atol=1e-6)
    result = pipe.finish(out)
    assert result.ok
    # without the adapter registered, the bundle names a model sdrun does not know
    REGISTRY.pop("toydet")
    with pytest.raises(BundleError, match="'toydet' has no adapter"):
        Pipeline.load(bundle)


def test_every_bundle_model_has_an_adapter_of_its_role(tiny_bundle):
    pipe = Pipeline.load(tiny_bundle)
    assert {name: m.role for name, m in pipe.models.items()} == {
        "owlvit": "detector", "gdino": "detector", "siamese": "change", "clip": "embedder"}
    assert pipe.change_model.name == "siamese" and pipe.embedder.name == "clip"
