"""Export facenet-pytorch's MTCNN networks (P-, R-, O-net, its bundled weights) to ONNX runtime graphs.

    .venv/bin/python scripts/export_mtcnn.py [--out verify/model/shipped/mtcnn] [--opset 17] [--check 5]

Writes pnet.onnx (dynamic batch, height and width), rnet.onnx and onet.onnx (dynamic batch) for
verify/faces/mtcnn_onnx.py, atomically (temp file + rename). Each graph records in its metadata where
its weights came from (facenet-pytorch 2.5.3, its licence) and the sha256 of the source .pt file.

Every per-channel PReLU after a convolution is rewritten (unless --plain-prelu) as

    Relu(x) + BatchNormalization[scale=-slope](Relu(BatchNormalization[scale=-1](x)))

(mean 0, variance 1, epsilon 0: the normalisations are exact multiplications). That is the same number
bit for bit: one of the two terms is exactly zero, the other is x or round(slope * x), as PReLU gives.
But ONNX Runtime keeps it in its blocked NCHWc layout (Relu and Add stay blocked, a BatchNormalization
becomes a depthwise 1x1 convolution), where a PReLU forces two layout conversions and runs a slow
broadcast: R- and O-net run about 1.7x faster on the CPU.

Then checks every graph under ONNX Runtime: against the PyTorch network on random inputs (the largest
absolute difference per output; exit 1 above --tol), and the rewritten graph against the plain export
(must be bit-identical).

Needs the `train` extra (torch, facenet-pytorch, onnx); the product path needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "verify" / "model" / "shipped" / "mtcnn"
LICENCE = ("MIT (facenet-pytorch, Copyright (c) 2019 Timothy Esler); the MTCNN weights are those facenet-pytorch "
           "ships, ported from davidsandberg/facenet (MIT, Copyright (c) 2016 David Sandberg)")

# name -> (class name, output names, dynamic axes of the input)
NETS = {
    "pnet": ("PNet", ("reg", "prob"), {0: "batch", 2: "height", 3: "width"}),
    "rnet": ("RNet", ("reg", "prob"), {0: "batch"}),
    "onet": ("ONet", ("reg", "points", "prob"), {0: "batch"}),
}
SAMPLE = {"pnet": (2, 3, 37, 53), "rnet": (4, 3, 24, 24), "onet": (4, 3, 48, 48)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export_bytes(net, sample, outputs, axes, opset: int) -> tuple[bytes, str]:
    """The ONNX bytes of `net` and which exporter made them (TorchScript-based first, else dynamo)."""
    import torch

    dyn = {"input": axes, **{o: {0: "batch"} for o in outputs}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based exporter"
            torch.onnx.export(net, (sample,), buf, input_names=["input"], output_names=list(outputs),
                              dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True)
        return buf.getvalue(), "torch.onnx.export(dynamo=False)"
    except Exception as e:  # the TorchScript exporter may be gone in a future torch
        print(f"  dynamo=False export failed ({type(e).__name__}: {e}); trying dynamo", file=sys.stderr)
    from torch.export import Dim

    shapes = {"x": {i: Dim(n, min=12 if n in ("height", "width") else 1) for i, n in axes.items()}}
    prog = torch.onnx.export(net, (sample,), input_names=["input"], output_names=list(outputs),
                             dynamic_shapes=shapes, opset_version=opset, dynamo=True)
    return prog.model_proto.SerializeToString(), "torch.onnx.export(dynamo=True)"


def rewrite_prelu(model):
    """Per-channel PReLU (slope (C, 1, 1)) -> Relu(x) + BN[-slope](Relu(BN[-1](x))), in place (see the
    module docstring); returns how many were rewritten. PReLUs after dense layers (slope (C,)) stay."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        slope = numpy_helper.to_array(inits[node.input[1]]) if node.op_type == "PRelu" and node.input[1] in inits else None
        if slope is None or slope.ndim != 3 or slope.shape[1:] != (1, 1):
            nodes.append(node)
            continue
        c, x, y, p = slope.shape[0], node.input[0], node.output[0], node.name or node.output[0]
        consts = {"neg_one": -np.ones(c), "neg_slope": -slope.reshape(c), "zero": np.zeros(c), "one": np.ones(c)}
        for k, v in consts.items():
            graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), f"{p}.{k}"))

        def bn(src, scale, dst):
            return helper.make_node("BatchNormalization", [src, f"{p}.{scale}", f"{p}.zero", f"{p}.zero", f"{p}.one"],
                                    [dst], name=dst, epsilon=0.0)

        nodes += [helper.make_node("Relu", [x], [f"{p}.pos"], name=f"{p}.pos"),  # max(x, 0)
                  bn(x, "neg_one", f"{p}.negx"),  # -x
                  helper.make_node("Relu", [f"{p}.negx"], [f"{p}.relu_negx"], name=f"{p}.relu_negx"),  # max(-x, 0)
                  bn(f"{p}.relu_negx", "neg_slope", f"{p}.neg"),  # slope * min(x, 0)
                  helper.make_node("Add", [f"{p}.pos", f"{p}.neg"], [y], name=f"{p}.add")]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]  # the old slopes go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def export(out_dir: Path, opset: int = 17, plain_prelu: bool = False) -> dict[str, Path]:
    import onnx
    import torch
    from facenet_pytorch.models import mtcnn as fm

    from verify.atomic import atomic_write_bytes

    version = _facenet_version()
    data = Path(fm.__file__).resolve().parent.parent / "data"
    written = {}
    for name, (cls, outputs, axes) in NETS.items():
        weights = data / f"{name}.pt"
        net = getattr(fm, cls)().eval()
        sample = torch.rand(SAMPLE[name]) * 2 - 1
        with torch.no_grad():
            raw, how = _export_bytes(net, sample, outputs, axes, opset)
        model = onnx.load_from_string(raw)
        onnx.checker.check_model(model)
        plain = model.SerializeToString()
        rewritten = 0 if plain_prelu else rewrite_prelu(model)
        onnx.checker.check_model(model)
        meta = {
            "source": f"facenet-pytorch {version} facenet_pytorch/data/{name}.pt ({cls})",
            "licence": LICENCE,
            "weights_sha256": sha256(weights),
            "exporter": f"{how}, torch {torch.__version__}, opset {opset}",
            "input": "NCHW float32 RGB, (pixel - 127.5) * 0.0078125",
            "prelu": (f"{rewritten} per-channel PReLU rewritten as Relu(x) + BN[-slope](Relu(BN[-1](x))) "
                      "(bit-identical, faster under ONNX Runtime)" if rewritten else "as exported"),
        }
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name = "faceverify scripts/export_mtcnn.py"
        path = out_dir / f"{name}.onnx"
        atomic_write_bytes(path, model.SerializeToString(), mode=0o644)
        written[name] = path
        _PLAIN[name] = plain
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size:,} bytes, "
              f"{how}, opset {opset}, {rewritten} PReLU rewritten, weights sha256 {meta['weights_sha256'][:16]}...")
    return written


_PLAIN: dict[str, bytes] = {}  # the graphs as exported, before the PReLU rewrite (for the check)


def _facenet_version() -> str:
    from importlib.metadata import version

    return version("facenet-pytorch")


def check(paths: dict[str, Path], trials: int = 5, tol: float = 1e-4) -> float:
    """Largest |onnxruntime - torch| over `trials` random inputs per net (several batch sizes and,
    for P-net, image sizes)."""
    import numpy as np
    import torch
    from facenet_pytorch.models import mtcnn as fm

    from verify.model.onnx_session import open_session

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    worst = 0.0
    for name, (cls, outputs, _) in NETS.items():
        net = getattr(fm, cls)().eval()
        sess = open_session(paths[name], threads=1)
        plain = None
        if name in _PLAIN:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            plain = ort.InferenceSession(_PLAIN[name], opts, providers=["CPUExecutionProvider"])
        diffs = [0.0] * len(outputs)
        same = True
        for t in range(trials):
            b = int(rng.integers(1, 40))
            if name == "pnet":
                shape = (int(rng.integers(1, 4)), 3, int(rng.integers(12, 300)), int(rng.integers(12, 300)))
            else:
                shape = (b, *SAMPLE[name][1:])
            x = (rng.random(shape, dtype=np.float32) * 2 - 1).astype(np.float32)
            got = sess.run(None, {"input": x})
            if plain is not None:
                same &= all(np.array_equal(g, q) for g, q in zip(got, plain.run(None, {"input": x})))
            with torch.no_grad():
                ref = net(torch.from_numpy(x))
            for i, (g, r) in enumerate(zip(got, ref)):
                assert g.shape == tuple(r.shape), (name, outputs[i], g.shape, tuple(r.shape))
                diffs[i] = max(diffs[i], float(np.abs(g - r.numpy()).max()))
        print(f"{name}: max |onnxruntime - torch| over {trials} random inputs: "
              + ", ".join(f"{o} {d:.2e}" for o, d in zip(outputs, diffs))
              + ("" if plain is None else f"; vs the plain export: {'bit-identical' if same else 'DIFFERENT'}"))
        worst = max(worst, *diffs)
        if not same:
            worst = float("inf")
    if worst > tol:
        print(f"FAIL: difference {worst:.2e} > {tol:g} (inf: the rewritten graph differs from the plain one)",
              file=sys.stderr)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--check", type=int, default=5, help="random inputs per net for the parity check (0: none)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--plain-prelu", action="store_true", help="keep the PReLU nodes as exported")
    args = ap.parse_args()
    if args.opset < 17:
        raise SystemExit("--opset must be >= 17")
    paths = export(args.out, args.opset, args.plain_prelu)
    if args.check and check(paths, args.check, args.tol) > args.tol:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
