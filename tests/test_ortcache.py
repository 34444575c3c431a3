"""The cache of optimised onnxruntime graphs: same outputs bit for bit, faster reopening,
safe against a broken cache entry, and off when asked."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.apps.check import golden_cases
from sdrun.backends.session import OnnxModel
from sdrun.bundle.bundle import Bundle

GRAPHS = [("owlvit", "image"), ("gdino", "model"), ("siamese", "pair"), ("clip", "visual")]


def _feeds(bundle, model, graph):
    entry = bundle.model(model)
    cases = golden_cases(bundle.arrays(entry["golden_file"]))
    return cases[("random", graph)]["in"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SPOTDIFF_CACHE_DIR", str(d))
    return d / "ort-graphs"


def test_cached_graphs_give_identical_outputs(tiny_bundle, cache, monkeypatch):
    b = Bundle.load(tiny_bundle)
    for model, graph in GRAPHS:
        path = b.path(b.model(model)["graphs"][graph]["file"])
        feeds = _feeds(b, model, graph)
        monkeypatch.setenv("SPOTDIFF_GRAPH_CACHE", "0")
        plain = OnnxModel(path, threads=1).run(feeds)
        monkeypatch.setenv("SPOTDIFF_GRAPH_CACHE", "1")
        first = OnnxModel(path, threads=1).run(feeds)    # optimises and saves
        saved = sorted(cache.glob("*.ort"))
        second = OnnxModel(path, threads=1).run(feeds)   # loads the saved graph
        assert sorted(cache.glob("*.ort")) == saved and saved
        for k in plain:
            np.testing.assert_array_equal(first[k], plain[k], err_msg=f"{model}/{graph} {k}")
            np.testing.assert_array_equal(second[k], plain[k], err_msg=f"{model}/{graph} {k}")
    assert len(list(cache.glob("*.ort"))) == len(GRAPHS)
    assert not list(cache.glob(".*tmp*"))  # no temporary files left behind


def test_broken_cache_entry_is_replaced(tiny_bundle, cache):
    b = Bundle.load(tiny_bundle)
    path = b.path(b.model("clip")["graphs"]["visual"]["file"])
    feeds = _feeds(b, "clip", "visual")
    want = OnnxModel(path, threads=1).run(feeds)
    (entry,) = cache.glob("*.ort")
    entry.write_bytes(b"not a graph")
    with pytest.warns(RuntimeWarning, match="cached optimised graph unusable"):
        got = OnnxModel(path, threads=1).run(feeds)
    np.testing.assert_array_equal(got["embeds"], want["embeds"])
    assert entry.stat().st_size > 1000  # written again


def test_cache_off_and_key(tiny_bundle, cache, monkeypatch):
    from sdrun.backends.ortcache import cache_key

    monkeypatch.setenv("SPOTDIFF_GRAPH_CACHE", "0")
    b = Bundle.load(tiny_bundle)
    OnnxModel(b.path(b.model("siamese")["graphs"]["pair"]["file"]), threads=1).session  # noqa: B018
    assert not cache.exists()
    k1, k2 = cache_key("ab" * 32, "1.2.3", 99), cache_key("ab" * 32, "1.2.4", 99)
    assert k1 != k2 and k1 != cache_key("cd" * 32, "1.2.3", 99) and k1 != cache_key("ab" * 32, "1.2.3", 2)
