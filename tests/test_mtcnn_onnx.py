"""verify/faces/mtcnn_onnx.py: MTCNN under ONNX Runtime without torch, against the PyTorch driver
(verify/faces/mtcnn.py, facenet-pytorch's networks): the same faces on real LFW photos, the helpers
bit-identical on identical inputs, missing/corrupt graphs refused in one line, no torch imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from verify.faces.mtcnn_onnx import MTCNN_DIR, OnnxMTCNN
from verify.model.onnx_session import RuntimeGraphError

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709

# LFW deep-funneled photos: several people, and photos with 2-4 faces (bystanders).
PHOTOS = [
    "Marcelo_Ebrard_0002", "Philippe_Noiret_0001", "Abdel_Nasser_Assidi_0001", "Billy_Crystal_0005",
    "Diego_Armando_Maradona_0001", "Ernie_Fletcher_0002", "Franco_Frattini_0001", "Gordana_Grubin_0001",
    "Hana_Urushima_0001", "Jeanne_Moreau_0001", "Kate_Hudson_0002", "Pete_Sampras_0003",
    "Pamela_Melroy_0001", "Habib_Rizieq_0004", "Lee_Soo-hyuck_0002", "Marina_Anissina_0002",
    "Allen_Iverson_0001", "Asa_Hutchinson_0001", "Bob_Geldof_0001", "Cassandra_Heise_0001",
    "Clifford_Robinson_0001", "David_Siegel_0001", "Edina_Batar_0001", "Fabrice_Santoro_0003",
    "George_Tenet_0002", "Hanan_Ashrawi_0001", "Irwan_Fadzi_Idris_0001", "Jean-Rene_Fourtou_0001",
    "Joe_Darrell_0001", "Jose_Sarney_0001", "Kent_Robinson_0001", "Leonid_Kuchma_0001", "Marcelo_Salas_0002",
    "Mehmet_Okur_0001", "Mireya_Moscoso_0001", "Norm_Macdonald_0001", "Perry_Farrell_0001", "Ray_Sherman_0001",
    "Robin_Williams_0001", "Sean_Astin_0001", "Steve_Cox_0001", "Thomas_OBrien_0008", "Venus_Williams_0001",
    "Zahir_Shah_0001",
]


@pytest.fixture(scope="module")
def photos(lfw_root: Path) -> dict[str, np.ndarray]:
    from verify.faces import load_image

    root = lfw_root / "lfw-deepfunneled"
    found = {n: root / n.rsplit("_", 1)[0] / f"{n}.jpg" for n in PHOTOS}
    found = {n: p for n, p in found.items() if p.is_file()}
    if len(found) < 30:
        pytest.skip(f"{root}: only {len(found)} of the {len(PHOTOS)} LFW test photos found")
    return {n: load_image(p) for n, p in found.items()}


@pytest.fixture(scope="module")
def torch_nets():
    """facenet-pytorch's MTCNN networks, as FaceDetector builds them."""
    pytest.importorskip("torch")
    from facenet_pytorch import MTCNN

    m = MTCNN(keep_all=True).eval()
    return m.pnet, m.rnet, m.onet


@pytest.fixture(scope="module")
def onnx_mtcnn() -> OnnxMTCNN:
    return OnnxMTCNN(threads=1)


def _torch_detect(imgs, nets, min_size):
    import torch

    from verify.faces.mtcnn import detect_faces

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return detect_faces(imgs, *nets, min_size, list(THRESHOLDS), FACTOR)
    finally:
        torch.set_num_threads(threads)


def _compare(ref, got, label: str, stats: dict) -> None:
    """Same faces per image (matched by box), boxes and landmarks within 1 px, probabilities within 1e-4."""
    assert len(ref) == len(got), label
    for i, ((rb, rp), (gb, gp)) in enumerate(zip(ref, got)):
        assert gb.shape == (len(gb), 5) and gp.shape == (len(gb), 5, 2), f"{label}[{i}]"
        assert len(rb) == len(gb), f"{label}[{i}]: torch found {len(rb)} faces, onnx {len(gb)}"
        if len(rb) == 0:
            continue
        d = np.abs(rb[:, None, :4] - gb[None, :, :4]).max(axis=2)  # (n_ref, n_got)
        match = d.argmin(axis=1)
        assert sorted(match.tolist()) == list(range(len(gb))), f"{label}[{i}]: faces do not pair up"
        gb, gp = gb[match], gp[match]
        stats["box"] = max(stats.get("box", 0.0), float(np.abs(rb[:, :4] - gb[:, :4]).max()))
        stats["points"] = max(stats.get("points", 0.0), float(np.abs(rp - gp).max()))
        stats["prob"] = max(stats.get("prob", 0.0), float(np.abs(rb[:, 4] - gb[:, 4]).max()))
        stats["faces"] = stats.get("faces", 0) + len(rb)
        assert np.abs(rb[:, :4] - gb[:, :4]).max() <= 1.0, f"{label}[{i}] boxes"
        assert np.abs(rp - gp).max() <= 1.0, f"{label}[{i}] landmarks"
        assert np.abs(rb[:, 4] - gb[:, 4]).max() <= 1e-4, f"{label}[{i}] probabilities"


# --------------------------------------------------------------------------------------------
# Detections: ONNX vs the PyTorch driver
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_size,batch", [(20, 8), (40, 4)])
def test_same_faces_as_torch_driver(photos, torch_nets, onnx_mtcnn, min_size, batch):
    names = sorted(photos)
    imgs = np.stack([photos[n] for n in names])  # (N, 250, 250, 3)
    stats: dict = {}
    multi = 0
    for i in range(0, len(imgs), batch):
        chunk = imgs[i : i + batch]
        ref = _torch_detect(chunk, torch_nets, min_size)
        got = onnx_mtcnn.detect_faces(chunk, min_size, THRESHOLDS, FACTOR)
        _compare(ref, got, f"{names[i]}.. min {min_size}", stats)
        multi += sum(len(b) >= 2 for b, _ in got)
        for b, p in got:
            assert b.dtype == np.float32 and p.dtype == np.float32
    assert stats["faces"] >= len(imgs)  # every photo has its person, some have more
    assert multi >= 5, "the photo set should hold several photos with more than one face"


def test_single_images_tiny_and_blank(photos, torch_nets, onnx_mtcnn):
    from PIL import Image

    face = photos[sorted(photos)[0]]
    tiny = np.asarray(Image.fromarray(face[60:190, 60:190]).resize((40, 40), Image.BILINEAR))  # one face, ~30 px
    grey = np.full((250, 250, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)  # odd sizes
    stats: dict = {}
    for label, img, min_size in (("tiny", tiny, 12), ("grey", grey, 20), ("noise", noise, 12),
                                 ("photo", face, 20)):
        ref = _torch_detect(img[None], torch_nets, min_size)
        got = onnx_mtcnn.detect_faces(img[None], min_size, THRESHOLDS, FACTOR)
        _compare(ref, got, label, stats)
        if label == "grey":
            assert len(got[0][0]) == 0 and got[0][1].shape == (0, 5, 2)
    # Smaller than the smallest face: no pyramid, no faces (the torch driver cannot run it at all).
    out = onnx_mtcnn.detect_faces(np.zeros((2, 10, 10, 3), np.uint8), 20, THRESHOLDS, FACTOR)
    assert [(b.shape, p.shape) for b, p in out] == [((0, 5), (0, 5, 2))] * 2


def test_chunked_runs_give_the_same_faces(photos):
    """R-/O-net chunks and P-net sub-batches change nothing."""
    imgs = np.stack([photos[n] for n in sorted(photos)[:8]])
    a = OnnxMTCNN(threads=1).detect_faces(imgs, 20, THRESHOLDS, FACTOR)
    b = OnnxMTCNN(threads=1, chunk=7, pnet_pixels=1).detect_faces(imgs, 20, THRESHOLDS, FACTOR)
    for (ba, pa), (bb, pb) in zip(a, b):
        np.testing.assert_array_equal(ba, bb)
        np.testing.assert_array_equal(pa, pb)


# --------------------------------------------------------------------------------------------
# The numpy helpers are bit-identical to facenet-pytorch's / torchvision's on the same inputs
# --------------------------------------------------------------------------------------------


def test_helpers_bit_identical():
    torch = pytest.importorskip("torch")
    from facenet_pytorch.models.utils import detect_face as fd
    from torchvision.ops.boxes import batched_nms as tv_batched_nms

    import verify.faces.mtcnn as tm
    import verify.faces.mtcnn_onnx as om

    rng = np.random.default_rng(0)
    # generateBoundingBox on P-net-like maps
    reg = (rng.standard_normal((3, 4, 41, 57)) * 0.1).astype(np.float32)
    probs = rng.random((3, 41, 57), dtype=np.float32)
    for scale in (0.6, 0.6 * 0.709**3, 12 / 40):
        rb, ri = fd.generateBoundingBox(torch.from_numpy(reg), torch.from_numpy(probs), scale, 0.6)
        ob, oi = om.generate_bounding_box(reg, probs, scale, 0.6)
        np.testing.assert_array_equal(rb.numpy(), ob)
        np.testing.assert_array_equal(ri.numpy(), oi)

    # torchvision batched_nms: the coordinate trick (<= 1000 boxes, incl. negative coordinates) and per image
    for n, lo in ((300, 0), (800, -30), (2500, 0), (2500, -30)):
        xy = rng.uniform(lo, 200, (n, 2)).astype(np.float32)
        wh = rng.uniform(5, 60, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.random(n, dtype=np.float32)
        inds = rng.integers(0, 5, n)
        for thr in (0.5, 0.7):
            ref = tv_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(inds), thr)
            np.testing.assert_array_equal(ref.numpy(), om.batched_nms(boxes, scores, inds, thr), err_msg=f"n={n}")
        ref = fd.batched_nms_numpy(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(inds),
                                   0.7, "Min")
        np.testing.assert_array_equal(ref.numpy(), om.batched_nms_numpy(boxes, scores, inds, 0.7, "Min"))

        # bbreg, rerec, pad
        b5 = np.concatenate([boxes, scores[:, None]], axis=1)
        mv = (rng.standard_normal((n, 4)) * 0.1).astype(np.float32)
        ref = fd.rerec(fd.bbreg(torch.from_numpy(b5.copy()), torch.from_numpy(mv)))
        got = om.rerec(om.bbreg(b5.copy(), mv))
        np.testing.assert_array_equal(ref.numpy(), got)
        for r, g in zip(fd.pad(ref, 190, 170), om.pad(got, 190, 170)):
            np.testing.assert_array_equal(r, g)

    # area resampling from the summed-area table
    imgs = rng.integers(0, 256, (3, 61, 83, 3), dtype=np.uint8)
    tsat, osat = tm.summed_area_table(imgs), om.summed_area_table(imgs)
    np.testing.assert_array_equal(tsat.numpy(), osat[..., :3])
    for size in ((37, 50), (12, 12), (61, 83)):
        ref = tm.resample_whole(tsat, size, scale=0.0078125, shift=-127.5 * 0.0078125)
        np.testing.assert_array_equal(ref.numpy(), om.resample_whole(osat, size, 0.0078125, -127.5 * 0.0078125))
    wide = rng.integers(0, 256, (2, 90, 1500, 3), dtype=np.uint8)  # several row bands per image
    tw, ow = tm.summed_area_table(wide), om.summed_area_table(wide)
    for size in ((54, 900), (89, 1499), (13, 217)):
        ref = tm.resample_whole(tw, size, scale=0.0078125, shift=-127.5 * 0.0078125)
        np.testing.assert_array_equal(ref.numpy(), om.resample_whole(ow, size, 0.0078125, -127.5 * 0.0078125))
    n = 50
    inds = rng.integers(0, 3, n)
    y0 = rng.integers(0, 40, n)
    x0 = rng.integers(0, 60, n)
    y1 = y0 + rng.integers(1, 61 - y0)
    x1 = x0 + rng.integers(1, 83 - x0)
    for size in (24, 48):
        ref = (tm.crop_resample(tsat, inds, y0, y1, x0, x1, size) - 127.5) * 0.0078125
        np.testing.assert_array_equal(ref.numpy(), om.crop_resample(osat, inds, y0, y1, x0, x1, size))


# --------------------------------------------------------------------------------------------
# Graph files and imports
# --------------------------------------------------------------------------------------------


def test_graphs_are_shipped_with_provenance():
    import onnx

    for name in ("pnet", "rnet", "onet"):
        path = MTCNN_DIR / f"{name}.onnx"
        assert path.is_file(), path
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert meta["source"].startswith("facenet-pytorch 2.5.3") and f"{name}.pt" in meta["source"]
        assert "MIT" in meta["licence"] and len(meta["weights_sha256"]) == 64


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
@pytest.mark.parametrize("name", ["pnet", "onet"])
def test_missing_or_corrupt_graph_is_one_line(tmp_path, damage, name):
    model_dir = tmp_path / "mtcnn"
    model_dir.mkdir()
    for n in ("pnet", "rnet", "onet"):
        (model_dir / f"{n}.onnx").write_bytes((MTCNN_DIR / f"{n}.onnx").read_bytes())
    bad = model_dir / f"{name}.onnx"
    if damage == "missing":
        bad.unlink()
    else:
        bad.write_bytes(b"\x00garbage, not a graph\xff" * 37)
    with pytest.raises(RuntimeGraphError) as err:
        OnnxMTCNN(model_dir, threads=1)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg


def test_import_and_detect_without_torch():
    code = (
        "import sys, numpy as np\n"
        "import verify.faces\n"
        "from verify.faces.mtcnn_onnx import OnnxMTCNN\n"
        "out = OnnxMTCNN(threads=1).detect_faces(np.full((1, 64, 80, 3), 90, np.uint8), 20, (0.6, 0.7, 0.7), 0.709)\n"
        "assert len(out) == 1\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'facenet_pytorch'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
