"""Embedding speed: the faceverify model (verify.model.file.Embedder) vs facenet-pytorch's
InceptionResnetV1 at its 160 px input, with and without flip test-time augmentation.

    .venv/bin/python bench/bench_embed.py [--model PATH] [--images 256] [--batch 64] [--repeats 3] [--threads 2]

Both embed the same aligned-face crops (the first CelebA sample images, cut with each model's crop
geometry; random pixels where ../shared/data is absent) from uint8 (N, S, S, 3) to unit vectors,
in eval mode under no_grad, `--batch` crops per forward pass, on the CPU:
  faceverify   Embedder.embed (its own normalisation; flip TTA on/off through meta["tta_flip"])
  facenet      InceptionResnetV1(pretrained=None) (random init: weights need internet; speed is the
               same), input (x - 127.5) / 128 as facenet-pytorch's fixed_image_standardization,
               flip TTA = a second forward pass on the mirrored batch, summed, then L2-normalised
Model: --model, else the shipped verify/model/shipped/default.pt, else a random-init model of
configs/identity-cpu.yaml's architecture (the output says which). Figures: images/s of the median
of --repeats passes over all --images crops, after one warm-up batch, all in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import face_crops, median_rate, print_table, ratio, resolve_model  # noqa: E402

from verify.model.backbones import count_parameters  # noqa: E402
from verify.model.file import Embedder  # noqa: E402

FACENET_SIZE = 160


class FacenetEmbedder:
    """facenet-pytorch's InceptionResnetV1 behind the same `embed(uint8 crops)` call as Embedder."""

    def __init__(self, tta_flip: bool) -> None:
        from facenet_pytorch import InceptionResnetV1

        torch.manual_seed(0)
        self.net = InceptionResnetV1(pretrained=None, classify=False).eval()
        self.tta_flip = tta_flip

    @torch.no_grad()
    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(crops), 512), dtype=np.float32)
        for s in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[s : s + batch_size]))
            x = (x.permute(0, 3, 1, 2).float() - 127.5) / 128.0  # (B,3,160,160)
            y = self.net(x)  # (B,512), unit vectors
            if self.tta_flip:
                y = y + self.net(torch.flip(x, dims=[3]))
            out[s : s + len(x)] = torch.nn.functional.normalize(y, dim=1).numpy()
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model, else a random-init stand-in)")
    ap.add_argument("--images", type=int, default=256, help="crops per timed pass")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        model_path, model_note = resolve_model(args.model, Path(tmp))
        ours = Embedder.load(model_path, "cpu")
    size = ours.geometry.size
    ours_crops, source = face_crops(args.images, size)
    fn_crops, _ = face_crops(args.images, FACENET_SIZE)
    arch = ours.meta["arch"]
    ours_label = f"faceverify {arch['backbone']} {size}px"
    shipped_flip = bool(ours.meta.get("tta_flip", True))

    rows = []
    for flip in (False, True):
        ours.meta["tta_flip"] = flip
        facenet = FacenetEmbedder(flip)
        ours.embed(ours_crops[: args.batch], args.batch)  # warm-up: one batch (first calls pick kernels)
        r_ours, _ = median_rate(lambda: ours.embed(ours_crops, args.batch), len(ours_crops), args.repeats, warmup=0)
        facenet.embed(fn_crops[: args.batch], args.batch)
        r_fn, _ = median_rate(lambda: facenet.embed(fn_crops, args.batch), len(fn_crops), args.repeats, warmup=0)
        tta = "flip TTA" if flip else "no TTA"
        rows.append((f"facenet InceptionResnetV1 {FACENET_SIZE}px", tta, f"{count_parameters(facenet.net) / 1e6:.2f}",
                     f"{r_fn:.1f}", "1.00x"))
        rows.append((ours_label, tta + (" (model default)" if flip == shipped_flip else ""),
                     f"{count_parameters(ours.net) / 1e6:.2f}", f"{r_ours:.1f}", ratio(r_ours, r_fn)))
        print(f"  {tta}: faceverify {r_ours:.1f} img/s, facenet {r_fn:.1f} img/s", file=sys.stderr, flush=True)
    ours.meta["tta_flip"] = shipped_flip

    print(f"\nembedding throughput (eval, no_grad, CPU), {args.images} crops per pass, batch {args.batch}, "
          f"median of {args.repeats} passes, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, {time.perf_counter() - t_start:.0f} s in all")
    print(model_note)
    print(f"faceverify arch: {arch['backbone']} width {arch.get('width')} layers {list(arch.get('layers', []))} "
          f"feature_dim {arch.get('feature_dim')} -> {ours.dim}-d; facenet: 512-d")
    print(f"input: {source}\n")
    print_table(("model", "TTA", "params (M)", "images/s", "vs facenet"), rows, right=(False, False, True, True, True))


if __name__ == "__main__":
    main()
