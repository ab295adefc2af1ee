"""The runtime graph of a model file: the whole `Embedder.embed` arithmetic as one ONNX graph, stored
beside the model file (`<model>.onnx`), so that ONNX Runtime alone embeds faces (verify/model/onnx_embedder.py).

What the graph does (input "crops": (N, S, S, 3) uint8 RGB, N dynamic; output "embeddings": (N, D) float32
unit rows): NHWC -> NCHW, x / 255, (x - mean) / std (one multiply and one add), the network, with the
model's flip test-time augmentation the network runs on [x, flip(x)] concatenated along the batch and the
two halves are added, then L2 normalisation. The runtime only calls `session.run`.

Two rewrites make the graph run well under ONNX Runtime's CPU layout optimiser (NCHWc), both exact up to
float rounding and applied to a copy of the network at export only:
- PReLU(z) = relu((1 - a) z) + a z per channel, as two depthwise 1x1 convolutions (one with the relu fused,
  one adding into it) when every slope a < 1, else (1 - a) relu(z) + a z. ONNX Runtime has no NCHWc PRelu:
  each PRelu node cost a layout round trip, and 30-35% of the shipped model's time went there.
- dlib's zero-padded residual add (`DlibBlock._add_padded`) as Pad + Add instead of in-place slice adds
  (which export as ScatterND over a ConstantOfShape: ~40% of dlib's time).

The graph's metadata (`metadata_props`, readable with onnxruntime alone through
`session.get_modelmeta().custom_metadata_map`): META_KEY holds JSON of what the runtime needs from the
model file (fingerprint, geometry, threshold, calibration, ...), the sha256 of the model file the graph was
made from (a graph is stale once that file changes) and the exporter's version; COHORT_KEY holds the
impostor cohort, when the model file has one, as base64 of its float16 bytes (shape in the JSON).

This module imports torch and onnx only inside `export_runtime_graph`: the torch-free loader imports its
names.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GRAPH_FORMAT = 1  # layout of the metadata; the loader refuses newer ones
EXPORTER_VERSION = 1  # bump when the graph made from the same model file would change
META_KEY = "faceverify"
COHORT_KEY = "faceverify.cohort"
INPUT_NAME = "crops"
OUTPUT_NAME = "embeddings"
OPSET = 17
DEFAULT_GRAPH = Path(__file__).resolve().parent / "shipped" / "default.onnx"
EXPORT_HINT = "faceverify model export"


def graph_path_for(model_path: str | os.PathLike) -> Path:
    """Where the runtime graph of a model file lives: same folder, same stem, `.onnx`."""
    return Path(model_path).with_suffix(".onnx")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    """json.dumps fallback for numpy scalars and arrays, tensors, paths."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    return str(v)


def export_runtime_graph(model_path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                         opset: int = OPSET, check: bool = True, ort_rewrites: bool = True) -> Path:
    """Write the runtime graph of the model file at `model_path` to `out` (default: beside it,
    `graph_path_for(model_path)`), atomically (temp file + rename; the model file's permissions).

    With `check` the new graph is run under ONNX Runtime on a few random crops before it replaces
    anything, and refused (RuntimeError) unless it agrees with the PyTorch Embedder (cosine >= 0.9999).
    `ort_rewrites=False` exports the network as it is (no PReLU / padded-add rewrites; for benchmarks).
    Needs torch and onnx (the training extra). Returns the graph's path."""
    from verify.atomic import atomic_path

    model_path = Path(model_path)
    out = Path(out) if out is not None else graph_path_for(model_path)
    if out.resolve() == model_path.resolve():
        raise ValueError(f"{model_path}: the runtime graph cannot overwrite its model file")
    emb, sha = _load_unchanging(model_path)
    model, how = _onnx_model(emb, opset, ort_rewrites)
    info = _graph_info(emb.meta, model_path, sha, how, opset, ort_rewrites)
    cohort_props = _cohort_props(emb.meta, info)  # sets info["cohort"] when the model has a cohort
    _stamp(model, info, cohort_props, model_path)
    data = model.SerializeToString()

    mode = stat.S_IMODE(os.stat(model_path).st_mode)
    with atomic_path(out, mode=mode) as tmp:
        tmp.write_bytes(data)
        if check:
            _check_against_torch(tmp, emb)
    log.info("%s: runtime graph of %s (%d bytes, %s, opset %d)", out, model_path, len(data), how, opset)
    return out


def _load_unchanging(model_path: Path) -> tuple[Any, str]:
    """(the PyTorch Embedder, the model file's sha256), refusing a file that changed while it was read
    or whose weights do not match its stored fingerprint."""
    from verify.model.file import Embedder, ModelFileError, fingerprint

    sha_before = file_sha256(model_path) if model_path.is_file() else None
    emb = Embedder.load(model_path, "cpu")  # ModelFileError (one line) for a missing or bad file
    sha = file_sha256(model_path)
    if sha != sha_before:
        raise RuntimeError(f"{model_path}: the model file changed while it was being exported; try again")
    if fingerprint(emb.net.state_dict()) != emb.meta.get("fingerprint"):
        raise ModelFileError(f"{model_path}: weights do not match the stored fingerprint; not exporting it")
    return emb, sha


def _onnx_model(emb, opset: int, ort_rewrites: bool) -> tuple[Any, str]:
    """(the checked onnx.ModelProto of the embedder's whole arithmetic, how it was exported)."""
    import onnx
    import torch

    flip = bool(emb.meta.get("tta_flip", True))
    wrapper = _graph_module(emb.net, emb.meta["normalisation"], flip, ort_rewrites)
    with torch.no_grad():
        raw, how = _export_bytes(wrapper, emb.geometry.size, opset)
    model = onnx.load_from_string(raw)
    onnx.checker.check_model(model)
    return model, how


def _graph_info(meta: dict, model_path: Path, sha: str, how: str, opset: int, ort_rewrites: bool) -> dict[str, Any]:
    """The META_KEY metadata: what the runtime needs from the model file (the cohort itself apart)."""
    import onnx
    import torch

    size = int(meta["geometry"]["size"])
    flip = bool(meta.get("tta_flip", True))
    extra = dict(meta.get("extra") or {})
    extra.pop("cohort", None)
    cohort_source = extra.pop("cohort_source", None)
    return {
        "format_version": GRAPH_FORMAT,
        "model_format_version": meta.get("format_version"),
        "fingerprint": meta["fingerprint"],
        "arch": meta.get("arch"),
        "embedding_dim": int(meta["embedding_dim"]),
        "geometry": meta["geometry"],
        "normalisation": meta["normalisation"],
        "threshold": float(meta["threshold"]),
        "calibration": meta.get("calibration") or {},
        "provenance": meta.get("provenance") or {},
        "tta_flip": flip,
        "cohort_source": cohort_source,
        "cohort": None,
        "extra": {k: v for k, v in extra.items() if not hasattr(v, "shape")},
        "model_file": model_path.name,
        "model_sha256": sha,
        "exporter": {"version": EXPORTER_VERSION, "how": how, "torch": torch.__version__, "onnx": onnx.__version__,
                     "opset": opset, "ort_rewrites": bool(ort_rewrites)},
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["N", size, size, 3]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", int(meta["embedding_dim"])],
                   "l2_normalised": True},
        "in_graph": ["NHWC->NCHW", "x/255", "(x-mean)/std", f"flip TTA: {'on' if flip else 'off'}", "L2 normalise"],
    }


def _cohort_props(meta: dict, info: dict[str, Any]) -> dict[str, str]:
    """{COHORT_KEY: base64 of the (C, D) little-endian float16 cohort} and its description in
    info["cohort"]; {} for a model without a cohort."""
    import numpy as np
    import torch

    cohort = (meta.get("extra") or {}).get("cohort")
    if cohort is None:
        return {}
    c16 = np.ascontiguousarray(cohort.detach().cpu().to(torch.float16).numpy() if hasattr(cohort, "detach")
                               else np.asarray(cohort, dtype=np.float16))
    info["cohort"] = {"key": COHORT_KEY, "dtype": "float16", "byteorder": "little", "shape": list(c16.shape),
                      "encoding": "base64"}
    return {COHORT_KEY: base64.b64encode(c16.astype("<f2").tobytes()).decode("ascii")}


def _stamp(model, info: dict[str, Any], cohort_props: dict[str, str], model_path: Path) -> None:
    """Replace the graph's metadata with META_KEY (info as JSON) + the cohort, and name what it is."""
    props = {META_KEY: json.dumps(info, default=_jsonable, sort_keys=True), **cohort_props}
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    size = info["input"]["shape"][1]
    model.producer_name = "faceverify verify/model/graph.py"
    model.doc_string = (f"faceverify embedding model {info['fingerprint']} ({model_path.name}): uint8 NHWC crops "
                        f"{size}x{size} -> {info['embedding_dim']}-d unit embeddings")


def _check_against_torch(graph: Path, emb, n: int = 5, min_cos: float = 0.9999) -> None:
    import numpy as np

    from verify.model.onnx_session import open_session

    size = emb.geometry.size
    crops = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    sess = open_session(graph, threads=1)
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: crops})[0]
    want = emb.embed(crops)
    cos = (got.astype(np.float64) * want).sum(1)
    if got.shape != want.shape or not np.isfinite(got).all() or cos.min() < min_cos:
        raise RuntimeError(f"{graph}: the exported graph disagrees with PyTorch (min cosine {cos.min():.6f} over "
                           f"{n} random crops); not writing it")


# --------------------------------------------------------------------------------------------
# The module that is exported (torch only below, imported inside the functions)
# --------------------------------------------------------------------------------------------


def _graph_module(net, normalisation: dict, flip: bool, ort_rewrites: bool = True):
    """uint8 NHWC crops -> unit embeddings, around a copy of `net` rewritten for ONNX Runtime."""
    import copy

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from verify.model.backbones import DlibBlock

    class PReLUAsConvs(nn.Module):
        """PReLU(z) = relu((1 - a) z) + a z (every a < 1), else (1 - a) relu(z) + a z, per channel, as
        depthwise 1x1 convolutions on (B, C, H, W) input: ops that ONNX Runtime keeps in its NCHWc layout."""

        def __init__(self, prelu: nn.PReLU) -> None:
            super().__init__()
            a = prelu.weight.detach().float().reshape(-1)
            self.register_buffer("slope", a.clone())
            self.register_buffer("w_pos", (1 - a).view(-1, 1, 1, 1).clone())
            self.register_buffer("w_neg", a.view(-1, 1, 1, 1).clone())
            self.relu_first = bool((a >= 1).any())  # relu((1-a) z) = (1-a) relu(z) needs 1 - a > 0

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            if z.dim() != 4:
                return F.prelu(z, self.slope)
            c = int(z.shape[1])
            wp, wn = self.w_pos, self.w_neg
            if wp.shape[0] != c:  # one slope for all channels
                wp, wn = wp.expand(c, 1, 1, 1), wn.expand(c, 1, 1, 1)
            pos = F.conv2d(F.relu(z), wp, groups=c) if self.relu_first else F.relu(F.conv2d(z, wp, groups=c))
            return pos + F.conv2d(z, wn, groups=c)

    class PaddedAddBlock(DlibBlock):
        @staticmethod
        def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            sa, sb = [int(v) for v in a.shape[1:]], [int(v) for v in b.shape[1:]]  # static: only N varies
            if sa == sb:
                return a + b
            c, h, w = (max(x, y) for x, y in zip(sa, sb))
            if sa != [c, h, w]:
                a = F.pad(a, (0, w - sa[2], 0, h - sa[1], 0, c - sa[0]))
            if sb != [c, h, w]:
                b = F.pad(b, (0, w - sb[2], 0, h - sb[1], 0, c - sb[0]))
            return a + b

    def rewrite(m: nn.Module) -> None:
        for name, child in m.named_children():
            if type(child) is nn.PReLU:
                setattr(m, name, PReLUAsConvs(child))
            else:
                if type(child) is DlibBlock:
                    child.__class__ = PaddedAddBlock
                rewrite(child)

    class RuntimeGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(net).float().eval().to(memory_format=torch.contiguous_format)
            if ort_rewrites:
                rewrite(self.net)
            mean = torch.tensor(normalisation["mean"], dtype=torch.float64)
            std = torch.tensor(normalisation["std"], dtype=torch.float64)
            # (x / 255 - mean) / std = x * scale + shift
            self.register_buffer("scale", (1.0 / (255.0 * std)).float().view(1, 3, 1, 1))
            self.register_buffer("shift", (-mean / std).float().view(1, 3, 1, 1))
            self.flip = flip

        def forward(self, crops: torch.Tensor) -> torch.Tensor:
            x = crops.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
            if self.flip:
                n = x.shape[0]
                y = self.net(torch.cat([x, torch.flip(x, dims=[3])], 0)).float()
                y = y[:n] + y[n:]
            else:
                y = self.net(x).float()
            return F.normalize(y, dim=1)

    return RuntimeGraph().eval()


def _export_bytes(module, size: int, opset: int) -> tuple[bytes, str]:
    """ONNX bytes of `module` with a dynamic batch, and which exporter made them: the TorchScript-based
    exporter first (fast, mature for these plain CNNs), else the dynamo one."""
    import torch

    sample = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DeprecationWarning (legacy exporter), TracerWarnings (int(shape))
            torch.onnx.export(module, (sample,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        return buf.getvalue(), "torch.onnx.export(dynamo=False)"
    except Exception as e:  # the TorchScript exporter may be gone in a future torch
        log.info("TorchScript-based ONNX export failed (%s: %s); trying dynamo", type(e).__name__, e)
    import contextlib

    from torch.export import Dim

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (sample,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 dynamic_shapes={"crops": {0: Dim("batch", min=1)}},
                                 opset_version=max(opset, 18), dynamo=True, verbose=False)
    return prog.model_proto.SerializeToString(), "torch.onnx.export(dynamo=True)"
