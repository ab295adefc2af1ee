"""Shared helpers of the benchmarks: timing, tables, real face crops, a stand-in model file, memory.

Not a library module: the benchmark scripts put the repository root on sys.path and import this as
`common` (it lives next to them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LFW = SHARED_DATA / "lfw" / "lfw-deepfunneled"
FACEVERIFY = REPO / ".venv" / "bin" / "faceverify"  # the CLI every command-line bench runs
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------------
# Timing and tables
# --------------------------------------------------------------------------------------------


def median_rate(step: Callable[[], None], items_per_step: int, steps: int, warmup: int = 1) -> tuple[float, float]:
    """(items/s of the median step, median seconds) after `warmup` untimed steps. The median keeps
    other processes' bursts on a shared machine out of the figure."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    med = float(np.median(seconds))
    return items_per_step / med, med


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> None:
    """A Markdown table (pastes into README.md as is); numbers right-aligned by default."""
    cells = [[str(c) for c in r] for r in rows]
    if right is None:
        right = [i > 0 for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"

    print(fmt(headers))
    print("|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|")
    for r in cells:
        print(fmt(r))


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "-"


def parse_size(text: str) -> tuple[int, int]:
    """A photo size given on the command line as WxH ("4032x3024") -> (4032, 3024)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def face_crops(n: int, size: int, data_root: Path = SHARED_DATA, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, size, size, 3) uint8 crops of the first n CelebA sample images (the training crop, via
    verify.training.cache.decode_crop, exactly what ImageCache stores), or random pixels where the data is
    absent; and a line saying which. Speed does not depend on the pixels, but real crops keep any
    data-dependent path (e.g. denormal numbers) honest."""
    from verify.training.cache import decode_crop
    from verify.model.geometry import CropGeometry

    folder = Path(data_root) / "celeba" / "img_align_celeba"
    files = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    if not files:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), f"random uint8 ({folder} not found)"
    geometry = CropGeometry(size=size)
    crops = np.stack([decode_crop(f, geometry) for f in files])  # (k, S, S, 3)
    if len(crops) < n:  # fewer images than asked: repeat them
        crops = crops[np.arange(n) % len(crops)]
    return crops, f"real CelebA crops ({min(n, len(files))} images from {folder})"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

CPU_CONFIG = REPO / "configs" / "identity-cpu.yaml"


def write_random_model(path: Path, config: Path = CPU_CONFIG) -> Path:
    """A model file with random weights and the architecture, crop size and embedding size of
    `config`: same speed as the trained model, useless answers. For benchmarks before a model
    is trained."""
    import torch

    from verify.model.backbones import backbone_from_config
    from verify.config import load_config
    from verify.model.geometry import CropGeometry
    from verify.model.write import save_model

    cfg = load_config(config)
    arch = cfg.to_dict()["model"]
    torch.manual_seed(0)
    net = backbone_from_config(arch, cfg.data.size, head="embedding", out_dim=cfg.model.embedding_dim)
    net.eval()
    save_model(path, net, arch=arch, geometry=CropGeometry(size=cfg.data.size, box=tuple(cfg.data.box)),
               threshold=0.5, calibration={}, provenance={"note": f"random init, benchmark stand-in for {config.name}"})
    return path


def resolve_model(model: str | None, tmp: Path) -> tuple[Path, str]:
    """(model file, a line describing it): --model, else the shipped model, else a random-init
    stand-in of configs/identity-cpu.yaml's architecture written into `tmp`."""
    from verify.model.file import DEFAULT_MODEL

    if model:
        return Path(model), f"model {model}"
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, f"shipped model {DEFAULT_MODEL.relative_to(REPO)}"
    path = write_random_model(tmp / "random-identity-cpu.pt")
    return path, (f"RANDOM-INIT stand-in: {DEFAULT_MODEL.relative_to(REPO)} does not exist yet; same architecture "
                  f"as {CPU_CONFIG.relative_to(REPO)} (speed is representative, matches are not)")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _tree_pids(root: int) -> list[int]:
    """`root` and all its descendants now, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _tree_rss_kb(root: int, pids: list[int] | None = None) -> int:
    """Resident memory (kB) of `root` and all its descendants (`pids`, when already listed), from /proc (Linux)."""
    total = 0
    for pid in _tree_pids(root) if pids is None else pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return total


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_label(pid: int, root: int) -> str:
    """A short name for a process of a measured command's tree: "command" (the root), "faceverify CMD",
    Ray's processes by their title (ray::MapWorker, raylet, gcs_server; an idle Ray worker is
    default_worker.py), Python helpers by their script, else the executable's name."""
    if pid == root:
        return "command"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split("(")[0].split()[0]
    if "multiprocessing" in " ".join(argv[1:4]):
        return "scan workers (multiprocessing)"
    if len(argv) > 2 and Path(argv[1]).name == "faceverify":
        return f"faceverify {argv[2]}"
    scripts = [a for a in argv[1:] if a.endswith(".py")]
    return Path(scripts[0]).name if scripts else Path(argv[0]).name


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process so far (s), from /proc/PID/stat; None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


class TreeMemorySampler:
    """Samples the summed RSS of a process tree every `interval` s in a thread; `peak_mb` after stop.
    With `cpu`, also each process's CPU seconds as last sampled (`cpu_by_label`: summed by
    `process_label`; a process that ends between two samples loses at most one interval)."""

    def __init__(self, pid: int, interval: float = 0.2, cpu: bool = False) -> None:
        self.pid, self.interval, self.peak_kb, self.cpu = pid, interval, 0, cpu
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (label, CPU seconds last seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree_pids(self.pid)  # one walk of /proc per sample, for memory and CPU
            self.peak_kb = max(self.peak_kb, _tree_rss_kb(self.pid, pids))
            if self.cpu:
                for pid in pids:
                    if (sec := _cpu_seconds(pid)) is not None:
                        label = process_label(pid, self.pid)  # every time: Ray retitles its workers
                        if label == "?" and pid in self._cpu:  # an exiting process (a zombie) has no argv
                            label = self._cpu[pid][0]
                        self._cpu[pid] = (label, sec)
            self._stop.wait(self.interval)

    @property
    def cpu_by_label(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, sec in self._cpu.values():
            out[label] = out.get(label, 0.0) + sec
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def start(self) -> "TreeMemorySampler":
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


class Measured:
    """A finished command: wall seconds, exit code, output, peak memory (MB) of its largest single
    process (wait4's ru_maxrss) and of its whole process tree summed (sampled, may miss short peaks)."""

    def __init__(self, argv: list[str], seconds: float, returncode: int, stdout: str, stderr: str,
                 max_rss_mb: float, tree_peak_mb: float) -> None:
        self.argv, self.seconds, self.returncode = argv, seconds, returncode
        self.stdout, self.stderr = stdout, stderr
        self.max_rss_mb, self.tree_peak_mb = max_rss_mb, tree_peak_mb
        self.cpu_by_label: dict[str, float] = {}  # process label -> CPU seconds (run_measured(cpu=True))

    def check(self, what: str) -> "Measured":
        if self.returncode != 0:
            tail = (self.stderr or self.stdout).strip().splitlines()[-5:]
            raise SystemExit(f"{what} failed (exit {self.returncode}): {' '.join(self.argv)}\n  " + "\n  ".join(tail))
        return self


_MAXRSS = "FACEVERIFY_BENCH_MAXRSS_KB "


def run_measured(argv: list[str], env: dict | None = None, cwd: str | Path | None = None, cpu: bool = False) -> Measured:
    """Run a command to completion; time it and measure its memory (with `cpu`, also the CPU seconds of
    each process of its tree: `Measured.cpu_by_label`)."""
    import tempfile

    # The largest process's peak comes from /usr/bin/time where present: wait4's ru_maxrss of a child
    # forked from this process reports this process's own peak when that is the larger.
    timed = Path("/usr/bin/time").exists() and argv[:1] != ["/usr/bin/time"]
    run_argv = ["/usr/bin/time", "-f", "\n" + _MAXRSS + "%M", *argv] if timed else argv
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # no pipe to fill up
        t0 = time.perf_counter()
        proc = subprocess.Popen(run_argv, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = TreeMemorySampler(proc.pid, cpu=cpu).start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        peak_mb = usage.ru_maxrss / 1024
        if timed and _MAXRSS in stderr:
            head, _, tail = stderr.rpartition(_MAXRSS)
            stderr, peak_mb = head.rstrip("\n"), int(tail.split()[0]) / 1024
        m = Measured(argv, seconds, proc.returncode, out.read().decode(errors="replace"), stderr, peak_mb,
                     max(sampler.peak_mb, peak_mb))  # the tree holds at least its largest process
        m.cpu_by_label = sampler.cpu_by_label
        return m


def self_peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB, Linux ru_maxrss is in kB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_code(rev: str, dest: Path) -> Path:
    """`verify/` and `index/` of git revision `rev` extracted into `dest` (a baseline to run with
    PYTHONPATH=dest side by side with this checkout)."""
    import subprocess

    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "verify", "index"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest
