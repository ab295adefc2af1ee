"""MTCNN under ONNX Runtime (verify/faces/mtcnn_onnx.py, no torch) vs the PyTorch driver (verify/faces/mtcnn.py),
per stage, plus int8 variants of the graphs and the cost of starting each runtime.

    .venv/bin/python bench/bench_runtime_detect.py [--images 64] [--batch 16] [--min-face 20 40] [--repeats 3]
    .venv/bin/python bench/bench_runtime_detect.py --photo-size 4032x3024 --images 8 --batch 8 --min-face 20

Photos: the first `--images` LFW deep-funneled photos (250x250) in sorted order, in batches of
`--batch` equal-sized images, as `faceverify scan` detects them; with `--photo-size`, phone-sized JPEGs
made from LFW photos (bench_decode.py's), loaded as a scan worker loads them (shrunk to 1600 px).
Both drivers run on one thread (torch.set_num_threads(1); ONNX Runtime intra-op threads 1, as a scan
worker) with facenet-pytorch's weights, thresholds (0.6, 0.7, 0.7) and pyramid step 0.709.

Stages, ms per image (median of `--repeats` passes): P = summed-area table + P-net over the pyramid
+ its NMS and regression; R = 24x24 crops + R-net + NMS; O = 48x48 crops + O-net + landmarks + NMS.
For the torch driver the stage boundaries are its two calls of `_crops`.

int8 rows: onnxruntime.quantization of the graphs as exported (PReLU not rewritten) (dynamic: weights int8, activations
quantised at run time; static: QDQ, per-channel int8 weights, uint8 activations calibrated (MinMax) on
the inputs the float pipeline feeds each net on other LFW photos). They are measured, not shipped:
"count agree" is the photos with as many faces as the float ONNX graphs find, the deltas are over faces
matched by box.

Float rows: the shipped graphs as OnnxMTCNN runs them (R-/O-net 16 candidates a run, P-net about 32k
input pixels a run: cache-sized work), all candidates in one run, the whole batch per P-net run with
512 candidates per R-/O-net run, and the graphs without export_mtcnn.py's PReLU rewrite.

The last table: a fresh Python process importing each runtime and building the detector (median of 3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, parse_size, print_table, ratio  # noqa: E402

from verify.faces import DetectorConfig, load_for_detection, load_image  # noqa: E402
from verify.faces.mtcnn_onnx import GRAPHS, MTCNN_DIR, OnnxMTCNN, summed_area_table  # noqa: E402

STAGES = ("P", "R", "O")


# --------------------------------------------------------------------------------------------
# Timed drivers: each returns (faces per image, seconds per stage) for one batch
# --------------------------------------------------------------------------------------------


def torch_driver(nets, min_size: float, thresholds, factor: float) -> Callable:
    import torch

    import verify.faces.mtcnn as tm

    marks: list[float] = []
    crops = tm._crops

    def marking_crops(*a, **k):
        marks.append(time.perf_counter())
        return crops(*a, **k)

    def run(batch: np.ndarray):
        marks.clear()
        tm._crops = marking_crops
        try:
            t0 = time.perf_counter()
            out = tm.detect_faces(batch, *nets, min_size, thresholds, factor)
            t3 = time.perf_counter()
        finally:
            tm._crops = crops
        t1 = marks[0] if marks else t3  # no candidates: no R or O stage
        t2 = marks[1] if len(marks) > 1 else t3
        return out, (t1 - t0, t2 - t1, t3 - t2)

    torch.set_num_threads(1)
    return run


def onnx_driver(det: OnnxMTCNN, min_size: float, thresholds, factor: float) -> Callable:
    def run(batch: np.ndarray):
        _, h, w, _ = batch.shape
        t0 = time.perf_counter()
        sat = summed_area_table(batch)
        boxes, inds = det.pnet_stage(sat, h, w, min_size, thresholds, factor)
        t1 = time.perf_counter()
        boxes, inds = det.rnet_stage(sat, boxes, inds, w, h, thresholds)
        t2 = time.perf_counter()
        boxes, points, inds = det.onet_stage(sat, boxes, inds, w, h, thresholds)
        t3 = time.perf_counter()
        out = [(boxes[inds == b].copy(), points[inds == b].copy()) for b in range(len(batch))]
        return out, (t1 - t0, t2 - t1, t3 - t2)

    return run


def measure(runs: list[Callable], chunks: list[np.ndarray], repeats: int) -> list[tuple[list, np.ndarray]]:
    """Per driver: faces per image (last pass) and the seconds per stage of its median pass. The drivers
    take turns pass by pass (one untimed pass each first), so that a slow spell of a shared machine, or
    memory a previous driver left behind, does not land on one of them only."""
    passes: list[list[np.ndarray]] = [[] for _ in runs]
    faces: list[list] = [[] for _ in runs]
    for r in range(repeats + 1):
        for k, run in enumerate(runs):
            out_faces, secs = [], np.zeros(3)
            for c in chunks:
                out, t = run(c)
                out_faces.extend(out)
                secs += t
            faces[k] = out_faces
            if r:
                passes[k].append(secs)
    result = []
    for k in range(len(runs)):
        p = np.array(passes[k])
        result.append((faces[k], p[np.argsort(p.sum(axis=1))[len(p) // 2]]))  # the median pass
    return result


def agreement(ref: list, got: list) -> tuple[int, float, float, float]:
    """(photos with as many faces, max box and landmark difference (px) and probability difference over
    faces matched by box, on those photos)."""
    same, dbox, dpts, dprob = 0, 0.0, 0.0, 0.0
    for (rb, rp), (gb, gp) in zip(ref, got):
        if len(rb) != len(gb):
            continue
        same += 1
        if len(rb) == 0:
            continue
        k = np.abs(rb[:, None, :4] - gb[None, :, :4]).max(axis=2).argmin(axis=1)
        dbox = max(dbox, float(np.abs(rb[:, :4] - gb[k, :4]).max()))
        dpts = max(dpts, float(np.abs(rp - gp[k]).max()))
        dprob = max(dprob, float(np.abs(rb[:, 4] - gb[k, 4]).max()))
    return same, dbox, dpts, dprob


# --------------------------------------------------------------------------------------------
# int8 graphs
# --------------------------------------------------------------------------------------------


class _Recorder:
    """Wraps a session; keeps (a sample of) the inputs it is given, for calibration."""

    def __init__(self, sess, keep: list, limit: int) -> None:
        self.sess, self.keep, self.limit = sess, keep, limit

    def get_inputs(self):
        return self.sess.get_inputs()

    def run(self, names, feed):
        x = next(iter(feed.values()))
        if sum(len(v) for v in self.keep) < self.limit:
            self.keep.append(x[: self.limit].copy())
        return self.sess.run(names, feed)


def calibration_inputs(imgs: np.ndarray, min_sizes, thresholds, factor, batch: int) -> dict[str, list[np.ndarray]]:
    """The inputs the float pipeline feeds each net on `imgs` (several P-net pyramid levels, R-/O-net crops)."""
    det = OnnxMTCNN(threads=1)
    kept: dict[str, list] = {n: [] for n in GRAPHS}
    det.pnet = _Recorder(det.pnet, kept["pnet"], 10_000)
    det.rnet = _Recorder(det.rnet, kept["rnet"], 4096)
    det.onet = _Recorder(det.onet, kept["onet"], 2048)
    for m in min_sizes:
        for i in range(0, len(imgs), batch):
            det.detect_faces(imgs[i : i + batch], m, thresholds, factor)
    # P-net: one image per sample (they differ in size); R/O: batches of 64 crops
    samples = {"pnet": [x[j : j + 1] for x in kept["pnet"] for j in range(len(x))][::3]}
    for n in ("rnet", "onet"):
        allx = np.concatenate(kept[n])
        samples[n] = [allx[i : i + 64] for i in range(0, len(allx), 64)]
    return samples


def quantise(out_dir: Path, kind: str, which: tuple[str, ...], samples: dict, src_dir: Path) -> str:
    """Graphs in `out_dir`: `which` quantised from `src_dir`'s (`kind` dynamic | static), the others the
    shipped float ones. Returns "" or why it failed."""
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)

    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's per-tensor chatter goes to the root logger
    for name in GRAPHS:
        src, dst = src_dir / f"{name}.onnx", out_dir / f"{name}.onnx"
        if name not in which:
            shutil.copyfile(MTCNN_DIR / f"{name}.onnx", dst)
            continue
        pre = out_dir / f"{name}.pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is advice, not a need
            shutil.copyfile(src, pre)
        try:
            if kind == "dynamic":
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
            else:
                class Reader(CalibrationDataReader):
                    def __init__(self, xs):
                        self.it = iter([{"input": x} for x in xs])

                    def get_next(self):
                        return next(self.it, None)

                quantize_static(str(pre), str(dst), Reader(samples[name]), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as e:
            return f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        finally:
            pre.unlink(missing_ok=True)
    return ""


# --------------------------------------------------------------------------------------------
# Start-up cost
# --------------------------------------------------------------------------------------------

_STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
{build}
t2 = time.perf_counter()
mem = {{}}
for line in open("/proc/self/status"):  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak
    if line.startswith(("VmRSS:", "VmHWM:")):
        mem[line[:5]] = int(line.split()[1]) / 1024
print(json.dumps({{"import": t1 - t0, "build": t2 - t1, "rss": mem["VmRSS"], "peak": mem["VmHWM"]}}))
"""

STARTUP_CASES = (
    ("python + numpy (baseline)", "import numpy", "pass"),
    ("onnxruntime: import onnxruntime, verify.faces.mtcnn_onnx; OnnxMTCNN()",
     "import numpy, onnxruntime\nfrom verify.faces.mtcnn_onnx import OnnxMTCNN",
     "det = OnnxMTCNN(threads=1)"),
    ("torch: import torch, facenet_pytorch, verify.faces.mtcnn; MTCNN()",
     "import numpy, torch, facenet_pytorch\nfrom facenet_pytorch import MTCNN\nimport verify.faces.mtcnn",
     "m = MTCNN(keep_all=True).eval()"),
)


def startup_rows(repeats: int = 3) -> list[tuple]:
    rows = []
    for label, imports, build in STARTUP_CASES:
        code = _STARTUP.format(imports=imports, build=build)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{label}: failed\n{proc.stderr[-1000:]}")
            runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "wall": wall})
        med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        rows.append((label, f"{med['import']:.2f}", f"{med['build']:.3f}", f"{med['wall']:.2f}",
                     f"{med['rss']:.0f}", f"{med['peak']:.0f}"))
    return rows


# --------------------------------------------------------------------------------------------


def load_photos(args) -> tuple[np.ndarray, np.ndarray, str]:
    """(bench photos, calibration photos (other ones), a line saying what they are)."""
    if args.photo_size:
        from bench_decode import make_photos

        size = parse_size(args.photo_size)
        cfg = DetectorConfig()
        with tempfile.TemporaryDirectory(prefix="bench-runtime-detect-") as tmp:
            paths = make_photos(Path(tmp), args.images, size)
            imgs = np.stack([load_for_detection(p, cfg.max_side)[0] for p in paths])
        lfw = SHARED_DATA / "lfw" / "lfw-deepfunneled"
        calib = np.stack([load_image(p) for p in sorted(lfw.glob("*/*.jpg"))[1::37][:48]])
        return imgs, calib, (f"{len(imgs)} photos {size[0]}x{size[1]} (LFW upscaled + grain) at "
                             f"{imgs.shape[2]}x{imgs.shape[1]}")
    lfw = SHARED_DATA / "lfw" / "lfw-deepfunneled"
    paths = sorted(lfw.glob("*/*.jpg"))
    if len(paths) < args.images:
        raise SystemExit(f"{lfw}: not enough LFW photos (see ../shared/data/README.md)")
    imgs = np.stack([load_image(p) for p in paths[: args.images]])
    calib = np.stack([load_image(p) for p in paths[args.images :: 37][:48]])  # photos not benchmarked
    return imgs, calib, f"{len(imgs)} LFW photos 250x250"


# The float graphs as OnnxMTCNN runs them, and two other ways to batch them: (label, OnnxMTCNN keywords).
FLOAT_CASES = (
    ("onnx float", {}),
    ("onnx float, R/O-net in one run", {"chunk": 0}),
    ("onnx float, P-net per batch, R/O-net by 512", {"chunk": 512, "pnet_pixels": 1 << 40}),
)
# int8 variants, measured not shipped: (label, quantisation kind, graphs quantised).
INT8_CASES = (
    ("int8 dynamic R/O-net", "dynamic", ("rnet", "onet")),
    ("int8 dynamic P/R/O-net", "dynamic", GRAPHS),
    ("int8 static R/O-net", "static", ("rnet", "onet")),
    ("int8 static P/R/O-net", "static", GRAPHS),
)


def graph_variants(args: argparse.Namespace, tmp: Path, calib: np.ndarray, thresholds: list, factor: float,
                   notes: list[str]) -> list[tuple[str, Path, dict]]:
    """(label, graph folder, OnnxMTCNN keywords) of every ONNX row: the float cases, the export without
    the PReLU rewrite, and (unless --no-int8) the int8 cases; what could not be made goes to `notes`."""
    variants = [(label, MTCNN_DIR, kw) for label, kw in FLOAT_CASES]
    plain = tmp / "plain-prelu"  # the export without the PReLU rewrite (scripts/export_mtcnn.py)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_mtcnn.py"), "--plain-prelu", "--check", "0",
                           "--out", str(plain)], capture_output=True, text=True)
    if proc.returncode == 0:
        variants.append(("onnx float, PReLU as exported (no rewrite)", plain, {}))
    else:
        notes.append(f"plain-PReLU export failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}")
    if args.no_int8:
        return variants
    samples = calibration_inputs(calib, args.min_face, thresholds, factor, 16)
    for label, kind, which in INT8_CASES:
        d = tmp / label.replace(" ", "_").replace("/", "")
        why = quantise(d, kind, which, samples, plain if plain.is_dir() else MTCNN_DIR)
        if why:
            notes.append(f"{label}: quantisation failed ({why})")
            continue
        size = sum((d / f"{n}.onnx").stat().st_size for n in GRAPHS) / 1e6
        variants.append((f"{label} ({size:.1f} MB)", d, {}))
    return variants


def min_face_table(min_face: int, nets, variants: list[tuple[str, Path, dict]], chunks: list[np.ndarray],
                   n: int, thresholds: list, factor: float, repeats: int, notes: list[str]) -> None:
    """One table at one minimum face size: the torch driver, then every variant that runs here."""
    min_size = max(12, min_face)
    print(f"\n## min face {min_face} px\n")
    runs, labels = [torch_driver(nets, min_size, thresholds, factor)], ["torch driver (verify.faces.mtcnn)"]
    for label, d, kw in variants:
        try:
            det = OnnxMTCNN(d, threads=1, **kw)
            det.detect_faces(chunks[0][:1], min_size, thresholds, factor)  # an int8 graph may not run here
        except Exception as e:
            notes.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        runs.append(onnx_driver(det, min_size, thresholds, factor))
        labels.append(label)
    results = measure(runs, chunks, repeats)
    ref, base = results[0]
    rows = [(labels[0], *(f"{1000 * s / n:.2f}" for s in base), f"{1000 * base.sum() / n:.2f}",
             sum(len(b) for b, _ in ref), "1.00x", "-", "-", "-")]
    float_faces = results[1][0]
    for k, (label, (faces, secs)) in enumerate(zip(labels[1:], results[1:])):
        # the float graphs vs the torch driver; int8 (and other) rows vs the float graphs
        same, dbox, dpts, dprob = agreement(ref if k == 0 else float_faces, faces)
        rows.append((label, *(f"{1000 * s / n:.2f}" for s in secs), f"{1000 * secs.sum() / n:.2f}",
                     sum(len(b) for b, _ in faces), ratio(base.sum(), secs.sum()), f"{same}/{n}",
                     f"{dbox:.2g}", f"{dprob:.2g}"))
    print_table(("driver", "P ms/img", "R ms/img", "O ms/img", "detect ms/img", "faces", "speed-up",
                 "count agree", "max box Δ px", "max prob Δ"), rows,
                right=[False] + [True] * 9)
    print("\n(agreement: onnx float vs the torch driver; int8 rows vs onnx float)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-face", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photo-size", default=None, help="WxH: big photos instead of LFW's 250x250")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 variants")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up table")
    args = ap.parse_args()

    imgs, calib, what = load_photos(args)
    chunks = [imgs[i : i + args.batch] for i in range(0, len(imgs), args.batch)]
    cfg = DetectorConfig()
    thresholds, factor = list(cfg.thresholds), cfg.factor

    from facenet_pytorch import MTCNN

    m = MTCNN(keep_all=True).eval()
    nets = (m.pnet, m.rnet, m.onet)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-runtime-int8-") as tmp:
        variants = graph_variants(args, Path(tmp), calib, thresholds, factor, notes)
        print(f"# {what}, batches of {args.batch}, 1 thread, median of {args.repeats}; "
              f"float graphs {sum((MTCNN_DIR / f'{n}.onnx').stat().st_size for n in GRAPHS) / 1e6:.1f} MB; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
        for min_face in args.min_face:
            min_face_table(min_face, nets, variants, chunks, len(imgs), thresholds, factor, args.repeats, notes)
    for line in notes:
        print(f"note: {line}")
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end: other processes on the machine skew the times)")

    if not args.no_startup:
        print("\n## start-up: fresh process, import + build the detector (median of 3)\n")
        print_table(("process", "import s", "build s", "process wall s", "RSS MB", "peak RSS MB"), startup_rows())

if __name__ == "__main__":
    main()
