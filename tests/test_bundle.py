"""Loading and validating bundles; `sdrun check` and `sdrun info` without PyTorch."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_without_torch

from sdrun.apps.check import check_bundle, compare, match_slots
from sdrun.bundle.bundle import Bundle
from sdrun.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root, m):
    (root / "manifest.json").write_text(json.dumps(m))


def test_tiny_bundle_passes_check(tiny_bundle):
    results = list(check_bundle(Bundle.load(tiny_bundle)))
    models = {r.model for r in results}
    assert models == {"owlvit", "gdino", "siamese", "clip"}
    for r in results:
        assert r.ok, r
        assert r.rel_l2 <= 1e-5
    # every graph was checked on a random and an image-like case
    cases = {(r.model, r.graph, r.case) for r in results}
    for model, graph in {(r.model, r.graph) for r in results}:
        assert {(model, graph, "random"), (model, graph, "image")} <= cases


def test_check_and_info_run_without_torch(tiny_bundle):
    res = run_without_torch(["check", str(tiny_bundle)])
    assert res.returncode == 0, res.stderr
    assert "all outputs within tolerance" in res.stdout
    assert "gdino" in res.stdout and "owlvit" in res.stdout
    res = run_without_torch(["info", str(tiny_bundle)])
    assert res.returncode == 0, res.stderr
    assert "[siamese]" in res.stdout and "42 labels" in res.stdout


def test_tampered_file_is_named(bundle_copy):
    target = bundle_copy / "clip" / "visual.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"clip/visual\.onnx: sha256 .* altered or corrupted"):
        Bundle.load(bundle_copy)
    res = run_without_torch(["check", str(bundle_copy)])
    assert res.returncode == 2
    assert "visual.onnx" in res.stderr and "Traceback" not in res.stderr


class CountingHash:
    def __init__(self, monkeypatch):
        import sdrun.bundle.digests

        self.calls = 0
        real = sdrun.bundle.digests.sha256_file

        def counting(path, *a, **k):
            self.calls += 1
            return real(path, *a, **k)

        monkeypatch.setattr(sdrun.bundle.digests, "sha256_file", counting)


def test_digests_are_remembered_until_a_file_changes(bundle_copy, tmp_path, monkeypatch):
    """The second load hashes nothing; a file rewritten with its old mtime and size is still
    caught (its ctime moved), and only that file is hashed again."""
    import os

    monkeypatch.setenv("SPOTDIFF_CACHE_DIR", str(tmp_path / "cache"))
    hashes = CountingHash(monkeypatch)
    n_files = len(_manifest(bundle_copy)["files"])
    Bundle.load(bundle_copy)
    assert hashes.calls == n_files
    Bundle.load(bundle_copy)
    assert hashes.calls == n_files  # all remembered

    target = bundle_copy / "siamese" / "pair.onnx"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(BundleError, match=r"siamese/pair\.onnx: sha256 .* altered or corrupted"):
        Bundle.load(bundle_copy)
    assert hashes.calls == n_files + 1


def test_digest_cache_never_condemns_or_breaks_a_load(bundle_copy, tmp_path, monkeypatch):
    """A garbage cache file is ignored; a remembered digest that disagrees with the manifest
    is re-checked from the file, not trusted; SPOTDIFF_DIGEST_CACHE=0 hashes every time."""
    from sdrun.bundle.digests import CACHE_FILE, DigestCache, signature

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPOTDIFF_CACHE_DIR", str(cache))
    cache.mkdir()
    (cache / CACHE_FILE).write_text("{not json")
    Bundle.load(bundle_copy)
    d = DigestCache()
    target = (bundle_copy / "clip" / "visual.onnx").resolve()
    assert d.entries[str(target)]["sig"] == signature(target)
    d.entries[str(target)]["sha256"] = "0" * 64  # a stale or wrong remembered digest
    d.dirty = True
    d.save()
    Bundle.load(bundle_copy)  # re-hashed, matches the manifest: loads
    assert DigestCache().entries[str(target)]["sha256"] == _manifest(bundle_copy)["files"]["clip/visual.onnx"]["sha256"]

    monkeypatch.setenv("SPOTDIFF_DIGEST_CACHE", "0")
    hashes = CountingHash(monkeypatch)
    Bundle.load(bundle_copy)
    Bundle.load(bundle_copy)
    assert hashes.calls == 2 * len(_manifest(bundle_copy)["files"])


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "owlvit" / "query_embeds.npy").unlink()
    with pytest.raises(BundleError, match=r"owlvit/query_embeds\.npy: missing"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "owlvit/../../x.npy"])
def test_path_escaping_the_bundle(bundle_copy, bad):
    m = _manifest(bundle_copy)
    m["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="outside the bundle folder|absolute path"):
        Bundle.load(bundle_copy)


def test_symlink_escaping_the_bundle(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(bundle_copy / "owlvit" / "prompt_labels.npy", outside)
    link = bundle_copy / "owlvit" / "prompt_labels.npy"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle folder"):
        Bundle.load(bundle_copy)


def test_wrong_schema_version(bundle_copy):
    m = _manifest(bundle_copy)
    m["schema_version"] = 99
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=r"manifest\.json: unknown schema_version 99"):
        Bundle.load(bundle_copy)


def test_unlisted_model_file(bundle_copy):
    m = _manifest(bundle_copy)
    m["models"]["clip"]["graphs"]["visual"]["file"] = "clip/other.onnx"
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="not listed in 'files'"):
        Bundle.load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def test_no_pickles_in_bundle(tiny_bundle):
    import numpy as np

    b = Bundle.load(tiny_bundle, verify=False)
    for rel in b.manifest["files"]:
        if rel.endswith(".npy"):
            np.load(tiny_bundle / rel, allow_pickle=False)
        if rel.endswith(".npz"):
            with np.load(tiny_bundle / rel, allow_pickle=False) as z:
                for k in z.files:
                    assert z[k].dtype != object


def test_check_fails_on_wrong_outputs(bundle_copy):
    """A golden file whose reference is perturbed beyond tolerance makes check exit 1."""
    import numpy as np

    m = _manifest(bundle_copy)
    rel = m["models"]["siamese"]["golden_file"]
    with np.load(bundle_copy / rel) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.endswith("__out__heat"))
    arrays[key] = arrays[key] * 1.001
    np.savez_compressed(bundle_copy / rel, **arrays)
    from sdrun.bundle.bundle import sha256_file

    m["files"][rel]["sha256"] = sha256_file(bundle_copy / rel)
    _write_manifest(bundle_copy, m)
    res = run_without_torch(["check", str(bundle_copy), "--model", "siamese"])
    assert res.returncode == 1
    assert "out of tolerance" in res.stderr


def test_compare_handles_non_finite():
    import numpy as np

    ref = np.array([1.0, -np.inf, 2.0])
    assert compare(ref.copy(), ref)[1] == 0.0
    assert compare(np.array([1.0, 0.0, 2.0]), ref)[1] == np.inf
    assert compare(np.array([1.0, -np.inf, 2.0 + 1e-3]), ref)[1] == pytest.approx(1e-3 / np.sqrt(5))


def test_match_slots_undoes_a_swap():
    import numpy as np

    rng = np.random.default_rng(0)
    ref = {"logits": rng.normal(size=(2, 6, 5)), "pred_boxes": rng.uniform(size=(2, 6, 4))}
    perm = np.array([0, 2, 1, 3, 5, 4])
    run = {k: v[:, perm] for k, v in ref.items()}
    fixed, moved = match_slots(run, ref, ["logits", "pred_boxes"], axis=1)
    assert moved == 8
    for k in ref:
        np.testing.assert_array_equal(fixed[k], ref[k])
