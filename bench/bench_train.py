"""Training speed of each backbone: images/s of forward + backward + AdamW step, vs the seed CNN.

    .venv/bin/python bench/bench_train.py [--steps 5] [--batch 64] [--threads 2]
                                          [--backbones seed-cnn@192 resnet-cpu@96 resnet@112 irv1@160]

Backbones (name@pixels; the pixel size may be changed, e.g. irv1@112):
  seed-cnn     the student project's 6-conv network at 192 px (the original; the baseline)
  resnet-cpu   resnet, width 24, layers (1,2,2,1), feature_dim 256 (configs/identity-cpu.yaml's model)
  resnet       resnet with the defaults of verify.model.backbones.create_backbone (width 32, 112 px)
  irv1         facenet-pytorch's InceptionResnetV1 (random init)
Each model gets the 40-attribute head (stage 1; stage 2's embedding head costs the same), BCE loss on
random targets, AdamW. Input: the same batch of real CelebA crops (verify.training.cache.decode_crop, i.e.
the rows ImageCache stores) at each model's size, random uint8 where ../shared/data is absent,
normalised to [-1, 1] inside the timed step. Figures are images/s of the median step after one
warm-up step; all models run in one process, one after another, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import face_crops, median_rate, print_table, ratio  # noqa: E402

from verify.model.backbones import count_parameters, create_backbone  # noqa: E402

N_ATTRIBUTES = 40
# label -> (create_backbone name, default pixels, extra create_backbone arguments)
BACKBONES = {
    "seed-cnn": ("seed-cnn", 192, {}),
    "resnet-cpu": ("resnet", 96, dict(width=24, layers=(1, 2, 2, 1), feature_dim=256)),
    "resnet": ("resnet", 112, {}),
    "irv1": ("inception-resnet-v1", 160, {}),
}
DEFAULT = ["seed-cnn@192", "resnet-cpu@96", "resnet@112", "irv1@112", "irv1@160"]


def parse_spec(spec: str) -> tuple[str, int]:
    label, _, px = spec.partition("@")
    if label not in BACKBONES:
        raise SystemExit(f"unknown backbone {label!r} in {spec!r}: choose from {', '.join(BACKBONES)}")
    try:
        size = int(px) if px else BACKBONES[label][1]
    except ValueError:
        raise SystemExit(f"bad pixel size in {spec!r}: expected NAME@PIXELS, e.g. resnet@112") from None
    return label, size


def measure(label: str, size: int, batch: int, steps: int) -> dict:
    name, _, extra = BACKBONES[label]
    torch.manual_seed(0)
    net = create_backbone(name, input_size=size, head="attributes", out_dim=N_ATTRIBUTES, **extra).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=5e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    crops, source = face_crops(batch, size)
    x_u8 = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()  # (B,3,S,S) uint8
    target = torch.randint(0, 2, (batch, N_ATTRIBUTES), generator=torch.Generator().manual_seed(0)).float()

    def step() -> None:
        x = x_u8.float().div_(127.5).sub_(1.0)  # (B,3,S,S) in [-1, 1]
        loss = loss_fn(net(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rate, sec = median_rate(step, batch, steps)
    return {"label": f"{label}@{size}", "params": count_parameters(net) / 1e6, "rate": rate, "step_s": sec,
            "source": source}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=DEFAULT, metavar="NAME[@PX]",
                    help=f"from {', '.join(BACKBONES)}; the first is the baseline (default: {' '.join(DEFAULT)})")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per backbone (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.backbones]
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    results = []
    for label, size in specs:
        results.append(measure(label, size, args.batch, args.steps))
        r = results[-1]
        print(f"  {r['label']}: {r['rate']:.1f} img/s ({r['step_s']:.2f} s/step)", file=sys.stderr, flush=True)

    print(f"\ntraining step (forward + backward + AdamW), batch {args.batch}, {args.steps} timed steps (median), "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"input: {results[0]['source']}\n")
    base = results[0]["rate"]
    print_table(
        ("backbone@px", "params (M)", "s/step", "images/s", f"vs {results[0]['label']}"),
        [(r["label"], f"{r['params']:.2f}", f"{r['step_s']:.3f}", f"{r['rate']:.1f}", ratio(r["rate"], base))
         for r in results],
    )


if __name__ == "__main__":
    main()
