"""The commands a user touches, end to end through Typer: enroll / verify / gallery with real LFW
faces. Mechanics (duplicates, exit codes, JSON shape, foreign-model refusal) use a tiny random model;
recognition quality uses the shipped default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version as package_version
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from verify.cli import app
from verify.model.file import DEFAULT_MODEL

from conftest import make_tiny_model

runner = CliRunner()
def tiny_model(path: Path, seed: int) -> Path:
    return make_tiny_model(path, seed=seed)


def person(lfw_root: Path, name: str) -> list[Path]:
    return sorted((lfw_root / "lfw-deepfunneled" / name).glob("*.jpg"))


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_only_working_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "evaluate", "calibrate", "enroll", "verify", "scan", "gallery"):
        assert cmd in r.output
    r = invoke("train", "--help")
    assert "attributes" in r.output and "identity" in r.output


def test_enroll_verify_gallery_mechanics(tmp_path, lfw_root):
    model = tiny_model(tmp_path / "a.pt", 0)
    g = tmp_path / "gallery"
    photos = person(lfw_root, "Jennifer_Lopez")[:3]
    r = invoke("enroll", "jlo", *photos, "--gallery", g, "--model", model, "--augment", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "3 photos used" in r.output and "9 vectors added" in r.output
    # the same photos again: nothing added (content hash), still a success
    r = invoke("enroll", "jlo", *photos, "--gallery", g, "--model", model, "--augment", 2, "--device", "cpu")
    assert r.exit_code == 0 and "0 vectors added" in r.output
    assert "already enrolled" in r.output
    r = invoke("gallery", "list", "--gallery", g)
    assert "jlo\t3 photos\t9 vectors" in r.output
    info = json.loads(invoke("gallery", "info", "--gallery", g).output)
    assert info["dim"] == 32

    # --json: one object per photo, with the documented keys; a no-face photo -> exit 1
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(grey)
    r = invoke("verify", photos[0], grey, "--gallery", g, "--model", model, "--json", "--device", "cpu")
    assert r.exit_code == 1, r.output
    lines = [json.loads(x) for x in r.output.strip().splitlines()]
    assert [Path(x["image"]).name for x in lines] == [photos[0].name, "grey.png"]
    face = lines[0]["faces"][0]
    assert set(face) >= {"box", "identity", "distance", "threshold", "match"} and len(face["box"]) == 4
    assert face["match"] is True and face["identity"] == "jlo"  # an enrolled photo matches itself
    assert lines[1]["faces"] == [] and lines[1]["error"] == "no face found"
    # unreadable file: reported in its line, not a crash
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    r = invoke("verify", bad, "--gallery", g, "--model", model, "--json", "--device", "cpu")
    assert r.exit_code == 1 and "bad.jpg" in json.loads(r.output)["error"]

    # a gallery made by another model is refused with a clear error, exit 2
    other = tiny_model(tmp_path / "b.pt", 1)
    r = runner.invoke(app, ["verify", str(photos[0]), "--gallery", str(g), "--model", str(other)])
    assert r.exit_code == 2 and "built by model" in r.output
    # unknown claimed identity -> exit 2
    r = runner.invoke(app, ["verify", str(photos[0]), "--gallery", str(g), "--model", str(model), "--as", "bob"])
    assert r.exit_code == 2 and "bob" in r.output

    r = invoke("gallery", "remove", "jlo", "--gallery", g)
    assert r.exit_code == 0 and "9 vectors" in r.output
    assert invoke("gallery", "remove", "jlo", "--gallery", g).exit_code == 1


def test_enroll_names_missing_inputs(tmp_path):
    model = tiny_model(tmp_path / "a.pt", 0)
    r = invoke("enroll", "bob", tmp_path / "nope.jpg", "--gallery", tmp_path / "g", "--model", model,
               "--device", "cpu")
    assert r.exit_code == 2
    assert f"{tmp_path / 'nope.jpg'}: no such file or folder" in r.output
    assert not (tmp_path / "g").exists()  # nothing created


def test_enroll_reports_photos_without_faces(tmp_path, lfw_root):
    model = tiny_model(tmp_path / "a.pt", 0)
    grey = tmp_path / "grey.png"
    Image.new("RGB", (160, 160), (90, 90, 90)).save(grey)
    r = invoke("enroll", "x", grey, "--gallery", tmp_path / "g", "--model", model, "--device", "cpu")
    assert r.exit_code == 1
    assert "no face found" in r.output and "0 photos used" in r.output


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
def test_shipped_model_accepts_the_person_and_rejects_others(tmp_path, lfw_root):
    """Enroll an LFW person from their first photos; their later photos are accepted, others not."""
    g = tmp_path / "gallery"
    name = "Jennifer_Lopez"  # 8 images in the shared data
    photos = person(lfw_root, name)
    r = invoke("enroll", name, *photos[:5], "--gallery", g, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = invoke("verify", *photos[5:], "--gallery", g, "--as", name, "--json", "--device", "cpu")
    mine = [json.loads(x) for x in r.output.strip().splitlines()]
    accepted = sum(any(f["match"] for f in x["faces"]) for x in mine)
    others = sorted(p for p in (lfw_root / "lfw-deepfunneled").iterdir() if p.name != name)[:40]
    strangers = [sorted(d.glob("*.jpg"))[0] for d in others]
    r = invoke("verify", *strangers, "--gallery", g, "--json", "--device", "cpu")
    theirs = [json.loads(x) for x in r.output.strip().splitlines()]
    false_accepts = sum(any(f["match"] for f in x["faces"]) for x in theirs)
    assert accepted >= 2, mine
    assert false_accepts <= 1, [x for x in theirs if any(f["match"] for f in x["faces"])]
    assert r.exit_code == (0 if false_accepts == len(theirs) else 1)


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
def test_enroll_flags_a_photo_of_someone_else(tmp_path, lfw_root):
    photos = person(lfw_root, "Jennifer_Lopez")[:5] + person(lfw_root, "Hans_Blix")[:1]
    r = invoke("enroll", "jlo", *photos, "--gallery", tmp_path / "g", "--device", "cpu")
    assert r.exit_code == 0, r.output
    flagged = [line for line in r.output.splitlines() if "is it really jlo" in line]
    assert any("Hans_Blix" in line for line in flagged), r.output
    assert len(flagged) <= 2, flagged



REPO = Path(__file__).resolve().parents[1]


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh interpreter, as a user starts the CLI, with extra environment."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
def test_version_names_the_package_and_the_shipped_model_without_torch():
    from verify.model.file import read_model_file

    code = ("import sys; from verify.cli import main; sys.argv = ['faceverify', '--version']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    r = run_python("-c", code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"faceverify {package_version('faceverify')}"
    assert lines[1].startswith(f"shipped model {read_model_file(DEFAULT_MODEL)['fingerprint']} ")
    assert lines[2] == "no torch"


def test_version_says_in_one_line_when_the_shipped_graph_is_missing(tmp_path, monkeypatch):
    from verify.model import onnx_embedder

    missing = tmp_path / "default.onnx"
    monkeypatch.setattr(onnx_embedder, "DEFAULT_GRAPH", missing)
    r = invoke("--version")
    assert r.exit_code == 0
    assert r.output.splitlines()[1] == f"shipped model unavailable: {missing}: runtime graph not found"


def test_shell_completion_completes_commands_and_subcommands():
    r = run_python("-m", "verify", "--show-completion", "bash")
    assert r.returncode == 0 and "_FACEVERIFY_COMPLETE=complete_bash" in r.stdout, r.stdout + r.stderr
    bash = {"_FACEVERIFY_COMPLETE": "complete_bash", "COMP_WORDS": "faceverify sc", "COMP_CWORD": "1"}
    assert run_python("-m", "verify", env=bash).stdout.split() == ["scan"]
    bash.update(COMP_WORDS="faceverify gallery ", COMP_CWORD="2")
    assert set(run_python("-m", "verify", env=bash).stdout.split()) == {"list", "remove", "info", "recalibrate"}
    zsh = {"_FACEVERIFY_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "faceverify --vers"}
    assert '"--version"' in run_python("-m", "verify", env=zsh).stdout
