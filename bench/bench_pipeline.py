"""Input pipeline benchmark: decode JPEGs every step vs the uint8 cache + batch augmentation.

    .venv/bin/python bench/bench_pipeline.py [--data ../shared/data/celeba] [--images 512] [--batch 64]
                                             [--model resnet|seed-cnn|inception-resnet-v1|none]
                                             [--steps 8] [--model-steps 3] [--device auto]

(a) "decode every step" is the original approach: per image, Pillow open + crop + resize, to a tensor,
    then per-image torchvision v2 RandomHorizontalFlip + RandomAffine, then normalise;
(a') the same, but the per-image transforms run on the PIL image (the fastest per-image variant);
(b) "cache + batch aug" gathers rows from the memory-mapped uint8 cache (built once, its cost printed
    separately) and runs one BatchAugment (affine_grid + grid_sample) on the whole batch.
All feed the same model forward + backward + SGD step on the same batches of indices, in the main
process (no DataLoader workers), so the numbers are the per-step cost each pipeline adds. Figures are
images/s of the median step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verify.training.augment import BatchAugment, batch_to_tensor, to_float  # noqa: E402
from verify.training.cache import ImageCache, decode_crop  # noqa: E402
from verify.data.celeba import ATTRIBUTES, load_celeba  # noqa: E402
from verify.model.geometry import CropGeometry  # noqa: E402
from verify.model.device import resolve_device  # noqa: E402

AUG = dict(hflip=True, rotation=20.0, zoom=0.2, shift=0.1)


def make_model(name: str, size: int) -> nn.Module:
    try:
        from verify.model.backbones import create_backbone
    except ImportError:  # the backbones module is optional for this benchmark
        import torchvision

        return torchvision.models.resnet18(num_classes=len(ATTRIBUTES))
    return create_backbone(name, input_size=size, head="attributes", out_dim=len(ATTRIBUTES))


def _per_image_transform():
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(
                degrees=AUG["rotation"], translate=(AUG["shift"], AUG["shift"]),
                scale=(1 - AUG["zoom"], 1 + AUG["zoom"]),
            ),
        ]
    )  # fmt: skip


class DecodeEveryStep:
    """(a) the original per-image pipeline: open, crop, resize, to tensor, augment (per image).

    `pil_augment=True` is the fastest per-image variant: the same transforms on the PIL image
    (Pillow's C affine on uint8) before the tensor conversion."""

    def __init__(self, paths: list[str], geometry: CropGeometry, pil_augment: bool = False) -> None:
        self.paths, self.geometry, self.pil_augment = paths, geometry, pil_augment
        self.per_image = _per_image_transform()

    def __call__(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        views = []
        for i in idx:
            img = decode_crop(self.paths[i], self.geometry)  # (S,S,3) uint8: open, crop, resize
            if self.pil_augment:
                img = np.array(self.per_image(Image.fromarray(img)))
                views.append(torch.from_numpy(img).permute(2, 0, 1))
            else:
                views.append(self.per_image(torch.from_numpy(img).permute(2, 0, 1)))  # (3,S,S)
        return to_float(torch.stack(views).to(device))  # (B,3,S,S)


class CachedBatches:
    """(b) rows of the uint8 memmap, one batched augmentation (on the model's device)."""

    def __init__(self, cache: ImageCache, seed: int) -> None:
        self.cache = cache
        self.augment = BatchAugment(**AUG)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        rows = self.cache.images[np.sort(idx)]  # (B,S,S,3) uint8; sorted reads are sequential-ish
        x = batch_to_tensor(rows).to(device, non_blocking=True)  # (B,3,S,S) uint8
        return self.augment(x, self.generator)


def _sync(device: torch.device) -> None:  # GPU work is asynchronous: wait before reading the clock
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(pipeline, batches: list[np.ndarray], device: torch.device, model: nn.Module | None, targets: torch.Tensor) -> float:
    """Images per second of the median step over `batches` (after one warm-up batch): the median
    keeps other processes' bursts on a shared machine out of the figure."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3) if model is not None else None
    loss_fn = nn.BCEWithLogitsLoss()

    def step(idx: np.ndarray) -> None:
        x = pipeline(idx, device)
        if model is not None:
            loss = loss_fn(model(x), targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)

    step(batches[0])
    seconds = []
    for idx in batches:
        t0 = time.perf_counter()
        step(idx)
        seconds.append(time.perf_counter() - t0)
    return len(batches[0]) / float(np.median(seconds))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba"))
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="resnet")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=None, help="timed data-only batches (default: one pass over --images)")
    ap.add_argument("--model-steps", type=int, default=3, help="timed batches with the model (each is slow on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--cache-dir", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--workers", type=int, default=None, help="cache build processes (default min(2, cpu))")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    geometry = CropGeometry(size=args.size)

    t = load_celeba(args.data, max_images=args.images, need_identity=False, need_partition=False).table
    paths = list(t["path"])
    targets = torch.from_numpy(t[list(ATTRIBUTES)].to_numpy(np.float32, copy=True))  # (N, 40)
    rng = np.random.default_rng(0)
    steps = args.steps or max(1, len(paths) // args.batch)
    batches = [rng.choice(len(paths), size=min(args.batch, len(paths)), replace=False) for _ in range(steps)]

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        t0 = time.perf_counter()
        cache = ImageCache.build_or_load(paths, geometry, cache_dir, "bench", workers=args.workers)
        build_s = time.perf_counter() - t0

        pipelines = {
            "a": DecodeEveryStep(paths, geometry),
            "a'": DecodeEveryStep(paths, geometry, pil_augment=True),
            "b": CachedBatches(cache, seed=0),
        }
        rows = [("data path only", {k: run(p, batches, device, None, targets) for k, p in pipelines.items()})]
        if args.model != "none":
            model = make_model(args.model, args.size).to(device).train()
            some = batches[: args.model_steps]
            rows.append((f"+ {args.model} fwd+bwd", {k: run(p, some, device, model, targets) for k, p in pipelines.items()}))
        del cache, pipelines

    print(f"\n{len(paths)} images from {args.data}, batch {args.batch}, {steps} (data) / {args.model_steps} (model) timed steps, "
          f"{args.size}px, device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus")  # fmt: skip
    print(f"cache build (once, reused by later epochs/runs): {build_s:.2f} s = {len(paths) / build_s:.0f} img/s")
    print("(a)  decode every step, per-image torchvision v2 flip+affine on the tensor (the original order)")
    print("(a') decode every step, the same per-image transforms on the PIL image (fastest per-image variant)")
    print("(b)  uint8 memmap cache + one BatchAugment (affine_grid + grid_sample) per batch\n")
    head = ("pipeline", "(a)", "(a')", "(b)", "b / a", "b / a'")
    print("| {:<22} | {:>11} | {:>11} | {:>11} | {:>6} | {:>6} |".format(*head))
    print(f"|{'-' * 24}|{'-' * 12}:|{'-' * 12}:|{'-' * 12}:|{'-' * 7}:|{'-' * 7}:|")
    for label, r in rows:
        a, a2, b = r["a"], r["a'"], r["b"]
        print(f"| {label:<22} | {a:>7.0f} i/s | {a2:>7.0f} i/s | {b:>7.0f} i/s | {b / a:>5.1f}x | {b / a2:>5.1f}x |")


if __name__ == "__main__":
    main()
