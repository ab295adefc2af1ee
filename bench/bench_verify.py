"""One photo, start to answer: `faceverify verify` and a one-photo `faceverify scan` (the start-up a
scan pays before its first photo) under each runtime, against face_recognition's CLI.

    .venv/bin/python bench/bench_verify.py [--repeats 5] [--fr-env /tmp/frenv] [--person Jennifer_Lopez]
                                           [--model PATH] [--runtimes onnx torch]

The person (LFW deep-funneled) is enrolled from ONE photo (`faceverify enroll NAME PHOTO`, default
augmentation, the same gallery for both runtimes: their embeddings agree to cosine 0.9999), and the
question is another photo of them. Rows, each one command in a fresh subprocess, run alternately
`--repeats` times (median wall; peak = the largest maximum resident set over the runs, of that one
process, as /usr/bin/time reports it):
- `faceverify verify PHOTO --as NAME --runtime R`: is this photo me?
- `faceverify scan FOLDER --workers 0 --runtime R --no-index` on a folder holding that one photo: the
  start-up of a scan (imports, model, detector) plus one photo, i.e. its time to the first photo.
- `face_recognition KNOWN_DIR PHOTO_DIR` (KNOWN_DIR: the same one enrollment photo; PHOTO_DIR: the
  question): the peer's answer to the same question (the venv of bench/README.md).
Nothing is written into the repository: a temp folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACEVERIFY, LFW, REPO, SHARED_DATA, print_table, ratio, resolve_model, run_measured  # noqa: E402



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fr-env", default="/tmp/frenv")
    ap.add_argument("--person", default="Jennifer_Lopez")
    ap.add_argument("--model", default=None)
    ap.add_argument("--runtimes", nargs="+", default=["onnx", "torch"], choices=("onnx", "torch"))
    args = ap.parse_args(argv)

    photos = sorted((LFW / args.person).glob("*.jpg"))
    if len(photos) < 2:
        raise SystemExit(f"{LFW / args.person}: need 2 photos")
    tmp = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        known, question, one = tmp / "known", tmp / "question", tmp / "one"
        for d, p in ((known, photos[0]), (question, photos[1]), (one, photos[1])):
            d.mkdir()
            shutil.copy(p, d / p.name)
        model, model_note = resolve_model(args.model, tmp)
        env = {**os.environ, "FACEVERIFY_HOME": str(tmp / "home")}
        gallery = ["--gallery", str(tmp / "gallery"), "--model", str(model)]
        run_measured([str(FACEVERIFY), "enroll", "me", str(known / photos[0].name), *gallery], env=env).check("enroll")

        commands: dict[str, list[str]] = {}
        for rt in args.runtimes:
            commands[f"faceverify verify --runtime {rt}"] = [
                str(FACEVERIFY), "verify", str(question / photos[1].name), "--as", "me", "--runtime", rt, *gallery]
        for rt in args.runtimes:
            commands[f"faceverify scan (1 photo) --runtime {rt}"] = [
                str(FACEVERIFY), "scan", str(one), "--workers", "0", "--runtime", rt, "--no-index",
                "--out", str(tmp / f"r-{rt}.csv"), *gallery]
        fr_cli = Path(args.fr_env) / "bin" / "face_recognition"
        if fr_cli.exists():
            commands["face_recognition KNOWN_DIR PHOTO_DIR"] = [str(fr_cli), str(known), str(question)]
        walls: dict[str, list[float]] = {k: [] for k in commands}
        peaks: dict[str, float] = dict.fromkeys(commands, 0.0)
        answers: dict[str, str] = {}
        for _ in range(args.repeats):  # alternating: drift of the machine hits every row alike
            for name, argv in commands.items():
                for rt in args.runtimes:  # a one-shot scan refuses to overwrite its report
                    (tmp / f"r-{rt}.csv").unlink(missing_ok=True)
                # /usr/bin/time's own ru_maxrss: a child forked from this (bigger) process would report
                # this process's peak when it exceeds the command's own
                m = run_measured(["/usr/bin/time", "-f", "MAXRSS_KB %M", *argv], env=env)
                if m.returncode not in (0, 1):
                    raise SystemExit(f"{name} failed ({m.returncode}): {m.stderr.strip()[-500:]}")
                walls[name].append(m.seconds)
                kb = [int(ln.split()[1]) for ln in m.stderr.splitlines() if ln.startswith("MAXRSS_KB ")]
                peaks[name] = max(peaks[name], kb[-1] / 1024 if kb else m.max_rss_mb)
                answers[name] = (m.stdout.strip().splitlines() or ["(no output)"])[-1][:90]

        print(f"\n{args.person}: enrolled from {photos[0].name}, question {photos[1].name}; {model_note}; "
              f"{os.cpu_count()} cpus; {args.repeats} runs each, alternating\n")
        base_name = "face_recognition KNOWN_DIR PHOTO_DIR" if "face_recognition KNOWN_DIR PHOTO_DIR" in walls else None
        base = statistics.median(walls[base_name]) if base_name else None
        rows = []
        for name in commands:
            med = statistics.median(walls[name])
            rows.append((name, f"{med:.2f}", " / ".join(f"{w:.2f}" for w in walls[name]), f"{peaks[name]:.0f}",
                         ratio(base, med) if base else "-", answers[name]))
        print_table(("command", "median wall s", "runs (s)", "peak MB", "vs face_recognition (its s / ours)",
                     "last line"), rows, right=(False, True, False, True, True, False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
