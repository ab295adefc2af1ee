"""Embedding under ONNX Runtime (OnnxEmbedder, the model file's runtime graph) vs PyTorch (Embedder):
speed per thread count and batch size, int8 quantised graphs (report only), and cold start.

    .venv/bin/python bench/bench_runtime_embed.py [--model runs/dlib.pt] [--images 128] [--repeats 5]
        [--calib 200] [--eval 100] [--no-quant] [--no-variants] [--no-cold]

Models: the shipped verify/model/shipped/default.pt, and --model too when given (e.g. dlib's network imported
by `faceverify model import-dlib`), each with its own flip TTA setting. The runtime graph is the one beside
the model file when it is current, else one exported into a temp folder.

1. Speed: ms/image and images/s of `Embedder.embed` (torch.set_num_threads 1 and 2) and
   `OnnxEmbedder.embed` (intra-op threads 1 and 2) at batch 1, 8 and 64, on real CelebA crops cut with the
   model's geometry (random pixels without ../shared/data). Contestants are timed in turn, round after
   round (--repeats), and the median pass is reported, so that a burst of other work on a shared machine
   hits all of them alike.
2. ONNX Runtime variants (1 thread, batch 1 and 64): the graph exported without the PReLU / padded-add
   rewrites (verify/model/graph.py), lower graph optimisation levels, IO binding with preallocated
   output, denormals as zero.
3. int8 (onnxruntime.quantization, per-channel int8 weights, from the float runtime graph after
   quant_pre_process): dynamic (ConvInteger / MatMulInteger), and static with --calib CelebA crops as
   the calibration set (uint8 activations; MinMax or Percentile ranges), QDQ and QOperator formats.
   Cosine of their embeddings to the float graph's on --eval LFW faces (MTCNN + align: the product
   path; not the calibration images), mean and min, and their speed. Nothing is shipped.
4. Cold start: a fresh `python -c` that imports, loads the model and embeds one crop, per runtime (torch:
   Embedder with torch's default threads; onnx: OnnxEmbedder, 1 thread): wall seconds (median of 3) and
   peak RSS (ru_maxrss of the process, RUSAGE_CHILDREN of a small launcher after waiting, as
   /usr/bin/time reports it), with the child's own split into import, load and first embed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, print_table, ratio, run_measured  # noqa: E402

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from verify.model.file import DEFAULT_MODEL, Embedder  # noqa: E402
from verify.model.onnx_embedder import OnnxEmbedder  # noqa: E402
from verify.model.onnx_session import RuntimeGraphError  # noqa: E402
from verify.model.graph import INPUT_NAME, OUTPUT_NAME, export_runtime_graph  # noqa: E402

BATCHES = (1, 8, 64)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def celeba_crops(n: int, geometry, skip: int = 0) -> tuple[np.ndarray, str]:
    """(n, S, S, 3) uint8: CelebA sample images cut with the model's own crop box (decode_crop, as
    training does), random pixels where the data is absent."""
    from verify.training.cache import decode_crop

    folder = SHARED_DATA / "celeba" / "img_align_celeba"
    files = sorted(folder.glob("*.jpg"))[skip : skip + n] if folder.is_dir() else []
    if not files:
        rng = np.random.default_rng(skip)
        return rng.integers(0, 256, (n, geometry.size, geometry.size, 3), dtype=np.uint8), "random pixels"
    crops = np.stack([decode_crop(f, geometry) for f in files])
    return crops[np.arange(n) % len(crops)], f"CelebA crops ({len(files)} images, model box)"


_LFW_FACES: list | None = None


def lfw_faces(n: int) -> list:
    """[(photo, landmarks)] of the largest face in the first photo of n LFW people (spread over the list)."""
    global _LFW_FACES
    if _LFW_FACES is None:
        from verify.faces import FaceDetector, load_image

        root = SHARED_DATA / "lfw" / "lfw-deepfunneled"
        if not root.is_dir():
            _LFW_FACES = []
            return _LFW_FACES
        people = sorted(p for p in root.iterdir() if p.is_dir())
        people = people[:: max(1, len(people) // n)][:n]
        photos = [load_image(sorted(p.glob("*.jpg"))[0]) for p in people]
        found = FaceDetector(device="cpu").detect(photos)
        _LFW_FACES = [(img, f[0].landmarks) for img, f in zip(photos, found) if f]
    return _LFW_FACES


def lfw_crops(n: int, geometry) -> np.ndarray | None:
    from verify.faces import align

    faces = lfw_faces(n)
    return np.stack([align(img, lm, geometry) for img, lm in faces]) if faces else None


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved(contestants: dict, crops: dict[int, np.ndarray], repeats: int) -> dict:
    """{(name, batch): median seconds per image}: per batch size, every contestant in turn per round."""
    out = {}
    for b, c in crops.items():
        times: dict[str, list[float]] = {k: [] for k in contestants}
        for k, f in contestants.items():
            f(c[: max(b, 2)], b)  # warm-up (first calls pick kernels, allocate)
        for _ in range(repeats):
            for k, f in contestants.items():
                t0 = time.perf_counter()
                f(c, b)
                times[k].append((time.perf_counter() - t0) / len(c))
        for k, v in times.items():
            out[(k, b)] = float(np.median(v))
    return out


def torch_embed(emb: Embedder, threads: int):
    def f(c, b):
        torch.set_num_threads(threads)
        return emb.embed(c, b)

    return f


def session(path: Path, threads: int = 1, level: str = "all", **config: str):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    o.log_severity_level = 3
    for k, v in config.items():
        o.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def session_embed(s):
    def f(c, b):
        return np.concatenate([s.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(c[i : i + b])})[0]
                               for i in range(0, len(c), b)])

    return f


def iobinding_embed(s, dim: int):
    buffers: dict[int, np.ndarray] = {}

    def f(c, b):
        out = np.empty((len(c), dim), dtype=np.float32)
        for i in range(0, len(c), b):
            x = np.ascontiguousarray(c[i : i + b])
            y = buffers.setdefault(len(x), np.empty((len(x), dim), dtype=np.float32))
            io = s.io_binding()
            io.bind_cpu_input(INPUT_NAME, x)
            io.bind_output(OUTPUT_NAME, "cpu", 0, np.float32, y.shape, y.ctypes.data)
            s.run_with_iobinding(io)
            out[i : i + len(x)] = y
        return out

    return f


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a.astype(np.float64) * b).sum(1)


# --------------------------------------------------------------------------------------------
# Per model
# --------------------------------------------------------------------------------------------


def runtime_graph(pt: Path, tmp: Path) -> tuple[OnnxEmbedder, str]:
    try:
        return OnnxEmbedder.load(pt), "beside the model file"
    except RuntimeGraphError as e:
        log(f"  {e}: exporting one into a temp folder")
        g = export_runtime_graph(pt, tmp / f"{pt.stem}.onnx")
        return OnnxEmbedder.load(g), "exported for this run"


def bench_model(pt: Path, label: str, args, tmp: Path) -> dict:
    torch_emb = Embedder.load(pt, "cpu")
    onnx_emb, where = runtime_graph(pt, tmp)
    geo = torch_emb.geometry
    flip = bool(torch_emb.meta.get("tta_flip", True))
    crops, source = celeba_crops(args.images, geo)
    log(f"{label}: {pt} ({geo.size}px, flip TTA {'on' if flip else 'off'}), graph {onnx_emb.graph_path} ({where})")
    result: dict = {"label": label, "path": pt, "graph": onnx_emb.graph_path, "size": geo.size, "flip": flip,
                    "source": source, "dim": torch_emb.dim, "graph_where": where}

    # parity on the timing crops, as a sanity check of what is timed
    result["parity_min_cos"] = float(cosines(onnx_emb.embed(crops), torch_emb.embed(crops)).min())

    # 1. speed
    sessions = {t: OnnxEmbedder.load(onnx_emb.graph_path, threads=t) for t in (1, 2)}
    contestants = {"torch 1": torch_embed(torch_emb, 1), "torch 2": torch_embed(torch_emb, 2),
                   "onnx 1": lambda c, b: sessions[1].embed(c, b), "onnx 2": lambda c, b: sessions[2].embed(c, b)}
    per_batch = {1: crops[:32], 8: crops[:64], 64: crops[:128]}
    log("  timing torch vs onnx ...")
    load0 = os.getloadavg()[0]
    result["speed"] = interleaved(contestants, per_batch, args.repeats)
    result["load"] = (load0, os.getloadavg()[0])

    # 2. ONNX Runtime variants, 1 thread
    if args.variants:
        log("  timing ONNX Runtime variants ...")
        plain = export_runtime_graph(pt, tmp / f"{pt.stem}-plain.onnx", ort_rewrites=False)
        g = onnx_emb.graph_path
        variants = {
            "runtime graph, ORT_ENABLE_ALL (shipped)": session_embed(session(g)),
            "graph without the PReLU/padded-add rewrites": session_embed(session(plain)),
            "runtime graph, ORT_ENABLE_EXTENDED": session_embed(session(g, level="extended")),
            "runtime graph, ORT_ENABLE_BASIC": session_embed(session(g, level="basic")),
            "runtime graph + IO binding (preallocated output)": iobinding_embed(session(g), torch_emb.dim),
            "runtime graph + denormals as zero": session_embed(session(g, **{"session.set_denormal_as_zero": "1"})),
        }
        result["variants"] = interleaved(variants, {1: crops[:32], 64: crops[:128]}, args.repeats)

    # 3. int8
    if args.quant:
        log("  quantising ...")
        result["quant"] = quantised(onnx_emb, geo, args, tmp, per_batch)

    torch.set_num_threads(args.threads_default)
    return result


def quantised(onnx_emb: OnnxEmbedder, geo, args, tmp: Path, per_batch: dict) -> list[tuple]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib, calib_source = celeba_crops(args.calib, geo, skip=args.images)  # not the timing crops
    evalc = lfw_crops(args.eval, geo)
    eval_source = f"{len(evalc)} LFW faces (MTCNN + align)" if evalc is not None else None
    if evalc is None:
        evalc, eval_source = celeba_crops(args.eval, geo, skip=args.images + args.calib)
        eval_source += " (LFW not found)"
    float_graph = onnx_emb.graph_path
    pre = tmp / f"{float_graph.stem}-pre.onnx"
    quant_pre_process(str(float_graph), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calib[i : i + 25]} for i in range(0, len(calib), 25)])

        def get_next(self):
            return next(self.batches, None)

    graphs = {}
    t0 = time.perf_counter()
    logging.disable(logging.WARNING)  # the quantiser logs whole tensor protos when shape inference is partial
    try:
        with contextlib.redirect_stdout(sys.stderr):  # and prints its calibration progress
            graphs["int8 dynamic (per-channel)"] = tmp / f"{float_graph.stem}-dyn.onnx"
            quantize_dynamic(str(pre), str(graphs["int8 dynamic (per-channel)"]), per_channel=True,
                             weight_type=QuantType.QInt8)
            for fmt, qf, method in (("QDQ", QuantFormat.QDQ, "MinMax"), ("QDQ", QuantFormat.QDQ, "Percentile"),
                                    ("QOperator", QuantFormat.QOperator, "Percentile")):
                name = f"int8 static {fmt} (per-channel, {method}, {len(calib)} crops)"
                graphs[name] = tmp / f"{float_graph.stem}-{fmt.lower()}-{method.lower()}.onnx"
                quantize_static(str(pre), str(graphs[name]), Reader(), quant_format=qf, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=getattr(CalibrationMethod, method))
    finally:
        logging.disable(logging.NOTSET)
    log(f"  quantised in {time.perf_counter() - t0:.0f} s; calibration: {calib_source}; evaluation: {eval_source}")

    ref = onnx_emb.embed(evalc)
    fns = {"float32 runtime graph": session_embed(session(float_graph))}
    cos = {"float32 runtime graph": np.ones(len(evalc))}
    for name, g in graphs.items():
        s = session(g)
        fns[name] = session_embed(s)
        cos[name] = cosines(fns[name](evalc, 64), ref)
    speed = interleaved(fns, {1: per_batch[1], 64: per_batch[64]}, max(3, args.repeats - 2))
    rows = []
    for name in fns:
        g = float_graph if name.startswith("float32") else graphs[name]
        rows.append((name, g.stat().st_size / 1e6, speed[(name, 1)], speed[(name, 64)],
                     float(cos[name].mean()), float(cos[name].min()), eval_source, len(calib)))
    return rows


# --------------------------------------------------------------------------------------------
# Cold start
# --------------------------------------------------------------------------------------------

COLD = {
    "torch": """
        import time; t0 = time.perf_counter()
        import numpy as np
        from verify.model.file import Embedder
        t1 = time.perf_counter(); e = Embedder.load({path!r}, "cpu"); t2 = time.perf_counter()
        v = e.embed(np.zeros((1, {size}, {size}, 3), dtype=np.uint8)); t3 = time.perf_counter()
    """,
    "onnx": """
        import time; t0 = time.perf_counter()
        import numpy as np
        from verify.model.onnx_embedder import OnnxEmbedder
        t1 = time.perf_counter(); e = OnnxEmbedder.load({path!r}, threads=1); t2 = time.perf_counter()
        v = e.embed(np.zeros((1, {size}, {size}, 3), dtype=np.uint8)); t3 = time.perf_counter()
    """,
}
COLD_TAIL = """
        import json, sys
        print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "embed": t3 - t2,
                          "torch_loaded": "torch" in sys.modules}}))
"""


# A small process starts the measured one and reports its wall time and peak RSS (RUSAGE_CHILDREN after
# waiting): started straight from this big process, a child's ru_maxrss would count the memory it shared
# with us between fork and exec.
LAUNCHER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
print(json.dumps({"wall": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
sys.exit(r.returncode)
"""


def cold_start(runtime: str, path: Path, size: int, runs: int = 3) -> dict:
    code = textwrap.dedent(COLD[runtime].format(path=str(path), size=size) + COLD_TAIL.format())
    ms = [run_measured([sys.executable, "-c", LAUNCHER, sys.executable, "-c", code], cwd=REPO)
          .check(f"cold start ({runtime})") for _ in range(runs)]
    inner = [json.loads(m.stdout.strip().splitlines()[-2]) for m in ms]
    outer = [json.loads(m.stdout.strip().splitlines()[-1]) for m in ms]
    return {"wall": float(np.median([o["wall"] for o in outer])), "rss": max(o["maxrss_kb"] for o in outer) / 1024,
            **{k: float(np.median([i[k] for i in inner])) for k in ("import", "load", "embed")},
            "torch_loaded": inner[0]["torch_loaded"]}


# --------------------------------------------------------------------------------------------


def print_header(args: argparse.Namespace, results: list[dict], load0: float, t_start: float) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"\nembedding: PyTorch Embedder vs ONNX Runtime OnnxEmbedder (runtime graph), CPU, {os.cpu_count()} cpus "
          f"({cpu}), torch {torch.__version__}, onnxruntime {ort.__version__}, load average {load0:.2f} at start / "
          f"{os.getloadavg()[0]:.2f} at end, {time.perf_counter() - t_start:.0f} s in all")
    print(f"median of {args.repeats} interleaved rounds; ms per image and images/s; every model with its own flip "
          f"TTA setting (on: two network passes per face)")
    for r in results:
        print(f"- {r['label']}: {r['path']} ({r['size']} px, {r['dim']}-d, flip TTA {'on' if r['flip'] else 'off'}); "
              f"graph {r['graph']} ({r['graph_where']}); timing input: {r['source']}; "
              f"min cosine onnx vs torch on them {r['parity_min_cos']:.7f}; 1-minute load average "
              f"{r['load'][0]:.2f} -> {r['load'][1]:.2f} while timing the speed table")


def speed_table(results: list[dict], cold: dict) -> None:
    print("\n### Speed\n")
    rows = []
    for r in results:
        for b in BATCHES:
            for t in (1, 2):
                tt, to = r["speed"][(f"torch {t}", b)], r["speed"][(f"onnx {t}", b)]
                rows.append((r["label"], b, t, f"{tt * 1e3:.2f}", f"{1 / tt:.0f}", f"{to * 1e3:.2f}", f"{1 / to:.0f}",
                             ratio(1 / to, 1 / tt)))
    print_table(("model", "batch", "threads", "torch ms/img", "torch img/s", "onnx ms/img", "onnx img/s",
                 "onnx vs torch"), rows, right=(False, True, True, True, True, True, True, True))


def variants_table(results: list[dict], cold: dict) -> None:
    print("\n### ONNX Runtime variants (1 thread)\n")
    rows = []
    for r in results:
        base = {b: r["variants"][("runtime graph, ORT_ENABLE_ALL (shipped)", b)] for b in (1, 64)}
        for name in dict.fromkeys(k for k, _ in r["variants"]):
            v1, v64 = r["variants"][(name, 1)], r["variants"][(name, 64)]
            rows.append((r["label"], name, f"{v1 * 1e3:.2f}", ratio(base[1], v1), f"{v64 * 1e3:.2f}",
                         ratio(base[64], v64)))
    print_table(("model", "variant", "b1 ms/img", "speed vs shipped", "b64 ms/img", "speed vs shipped"), rows,
                right=(False, False, True, True, True, True))


def quant_table(results: list[dict], cold: dict) -> None:
    print("\n### int8 quantisation (report only; 1 thread)\n")
    rows = []
    for r in results:
        f1, f64 = r["quant"][0][2], r["quant"][0][3]
        for name, mb, s1, s64, cmean, cmin, _, _ in r["quant"]:
            rows.append((r["label"], name, f"{mb:.1f}", f"{s1 * 1e3:.2f}", f"{s64 * 1e3:.2f}", ratio(f64, s64),
                         f"{cmean:.5f}", f"{cmin:.5f}"))
    print_table(("model", "graph", "MB", "b1 ms/img", "b64 ms/img", "b64 speed vs float", "cos mean", "cos min"),
                rows, right=(False, False, True, True, True, True, True, True))
    print(f"cosines: to the float32 runtime graph's embeddings of {results[0]['quant'][0][6]}; static "
          f"calibration on CelebA crops not among them")


def cold_table(results: list[dict], cold: dict) -> None:
    print("\n### Cold start: fresh process, import + load + embed 1 crop\n")
    rows = []
    for (label, runtime), c in cold.items():
        rows.append((label, runtime, f"{c['wall']:.2f}", f"{c['import']:.2f}", f"{c['load']:.2f}",
                     f"{c['embed'] * 1e3:.0f}", f"{c['rss']:.0f}", "yes" if c["torch_loaded"] else "no"))
    print_table(("model", "runtime", "wall s", "import s", "load s", "first embed ms", "peak RSS MB",
                 "torch imported"), rows, right=(False, False, True, True, True, True, True, False))


# The tables, in order: (the option that turns it off (args attribute) or None, what prints it).
TABLES = (
    (None, speed_table),
    ("variants", variants_table),
    ("quant", quant_table),
    ("cold", cold_table),
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a second model file to bench after the shipped one (e.g. dlib's)")
    ap.add_argument("--images", type=int, default=128, help="timing crops (batch 1: 32 of them, batch 8: 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    ap.add_argument("--calib", type=int, default=200, help="calibration crops of static int8 quantisation")
    ap.add_argument("--eval", type=int, default=100, help="LFW photos whose faces measure int8 cosines")
    ap.add_argument("--no-quant", dest="quant", action="store_false")
    ap.add_argument("--no-variants", dest="variants", action="store_false")
    ap.add_argument("--no-cold", dest="cold", action="store_false")
    args = ap.parse_args(argv)
    args.threads_default = torch.get_num_threads()
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]

    models = [(DEFAULT_MODEL, "shipped")] + ([(Path(args.model), Path(args.model).stem)] if args.model else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pt, label in models:
            results.append(bench_model(pt, label, args, Path(tmp)))
        cold = {}
        if args.cold:
            log("cold starts ...")
            for r in results:
                for runtime in ("torch", "onnx"):
                    cold[(r["label"], runtime)] = cold_start(runtime, r["path"] if runtime == "torch" else r["graph"],
                                                             r["size"])

    print_header(args, results, load0, t_start)
    for flag, table in TABLES:
        if flag is None or getattr(args, flag):
            table(results, cold)

if __name__ == "__main__":
    main()
