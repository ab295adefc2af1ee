"""A model file's CelebA verification figures on fixed roots, whatever data it was trained on.

A run's own `celeba_val` / `celeba_test` are measured on its training roots' partitions 1 and 2, which
grow when data is added (issue 18). The model card compares models on the same images: by default the
shared roots' partition 2 (77 identities, 1,803 images), with the same all-pairs evaluation as training.

    .venv/bin/python scripts/celeba_eval.py --model M [--model M2 ...] [--partition 2] [--root R ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from scenario import DATA  # noqa: E402
from verify.training.augment import NORMALISATION  # noqa: E402
from verify.config import load_config  # noqa: E402
from verify.model.file import Embedder  # noqa: E402
from verify.training import Dist, evaluate_identity, prepare_data  # noqa: E402

# the shared roots, wherever this is run from (scenario.DATA: next to the repository)
SHARED = [str(DATA / name) for name in ("celeba", "celeba_wild", "celeba_half")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--root", action="append", default=None, help=f"data roots (default: {' '.join(SHARED)})")
    ap.add_argument("--partition", type=int, default=2, choices=(1, 2))
    args = ap.parse_args()
    out = {}
    for path in args.model:
        emb = Embedder.load(path)
        if dict(emb.meta["normalisation"]) != dict(NORMALISATION):
            print(f"error: {path}: input normalisation {emb.meta['normalisation']} is not the training one", file=sys.stderr)
            return 2
        geo = emb.geometry
        cfg = load_config(None, {"task": "identity", "data.roots": args.root or SHARED, "data.size": geo.size,
                                 "data.box": list(geo.box), "data.cache_workers": 0})
        data = prepare_data(cfg, Dist())
        rows = data.rows(args.partition)
        r = evaluate_identity(emb.net, data, rows, emb.device, flip=bool(emb.meta.get("tta_flip", True)))
        out[str(path)] = r
        print(f"{path} ({emb.fingerprint}): partition {args.partition}, {r['images']} images of {r['identities']} "
              f"identities: AUC {r['auc']:.4f}, EER {r['eer']:.4f}, TAR@1e-3 {r['tar_at_far']['1e-03']:.3f}, "
              f"accuracy {r['accuracy']:.4f}", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
