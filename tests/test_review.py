"""`faceverify review` in a real browser (Debian's chromium + chromium-driver through Selenium), on a
few real LFW photos with the shipped model: reject a match with the keyboard, confirm a near miss,
name a group; and the security rules (token, traversal, POST only) and a clean stop."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from typer.testing import CliRunner

from index import Gallery
from index.library import Library
from verify.cli import app

from test_library_cli import copy_photos, person

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def webdriver_or_skip():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if exe is None or driver is None:
        why = "chromium, chromium-driver and selenium are needed (bash scripts/ensure_chromium.sh; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return exe, driver


def start_review(db: Path, g: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """The app in its own process; returns it and the URL it printed as its first line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "verify", "review", "--index", str(db), "--gallery", str(g),
                             "--no-browser", "--device", "cpu", "--augment", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and "/?token=" in url, (url, proc.stderr.read() if proc.poll() else "")
    return proc, url


def status_of(url: str, path: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> int:
    """HTTP status of a raw request path (sent as is: no client-side normalisation of '..')."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    status = conn.getresponse().status
    conn.close()
    return status


def post(url: str, path: str, token: str, payload: dict) -> dict:
    req = urllib.request.Request(url.split("/?")[0] + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"X-Token": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def library(lfw_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    g, db = tmp / "gallery", tmp / "lib.db"
    jlo = person(lfw_root, "Jennifer_Lopez")
    assert invoke("enroll", "jlo", *jlo[:3], "--gallery", g, "--device", "cpu", "--augment", 1).exit_code == 0
    photos = tmp / "photos"
    copy_photos(photos / "me", jlo[3:])
    copy_photos(photos / "others", person(lfw_root, "Hans_Blix") + person(lfw_root, "Donald_Rumsfeld")
                + person(lfw_root, "Paul_Wolfowitz"))
    r = invoke("scan", photos, "--gallery", g, "--device", "cpu", "--workers", 0, "--index", db, "--out", tmp / "r.csv")
    assert r.exit_code == 0, r.output
    return tmp, g, db


def find_paths(tmp: Path, g: Path, db: Path, name: str, out: str) -> set[str]:
    r = invoke("find", name, "--gallery", g, "--index", db, "--out", tmp / out)
    assert r.exit_code in (0, 1), r.output
    return set(pd.read_csv(tmp / out)["path"])


def test_review_in_chromium_reject_confirm_name(library):
    exe, driver_path = webdriver_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    tmp, g, db = library
    proc, url = start_review(db, g, "--near-miss", "1.0")
    token = url.split("token=")[1]
    base = url.split("/?")[0]
    options = webdriver.ChromeOptions()
    options.binary_location = exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        def faces(css: str) -> list:
            return browser.find_elements(By.CSS_SELECTOR, css)

        def wait_status(text: str) -> str:
            WebDriverWait(browser, 60).until(lambda b: text in b.find_element(By.ID, "status").text
                                             or "error" in b.find_element(By.ID, "status").text)
            return browser.find_element(By.ID, "status").text

        browser.get(url)
        assert "jlo" in browser.page_source
        browser.get(f"{base}/person?token={token}&name=jlo")
        matched = faces(".matched .face")
        assert len(matched) >= 2
        # the first thumbnail (in view; the others load lazily) arrives as a picture through the token
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "const i = document.querySelector('.matched img'); return i.complete && i.naturalWidth > 0"))
        first = matched[0]
        rejected_id = first.get_attribute("data-face-id")
        rejected_path = Library.open(db, readonly=True).face_locations([int(rejected_id)])[int(rejected_id)][0]
        assert browser.switch_to.active_element == first  # the page focuses the first face
        first.send_keys("n")
        assert "reject jlo" in wait_status("decision")
        browser.refresh()
        assert rejected_id not in [f.get_attribute("data-face-id") for f in faces(".matched .face")]
        assert rejected_path not in find_paths(tmp, g, db, "jlo", "after_reject.csv")

        # a near miss: move to it with the arrow keys, confirm it with y
        near = faces(".near .face")
        assert near, "no near miss to confirm"
        assert browser.switch_to.active_element == faces(".face")[0]
        for _ in range(len(faces(".matched .face"))):
            browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        target = browser.switch_to.active_element
        assert target.get_attribute("data-face-id") == near[0].get_attribute("data-face-id")
        confirmed_id = int(target.get_attribute("data-face-id"))
        confirmed_path = Library.open(db, readonly=True).face_locations([confirmed_id])[confirmed_id][0]
        target.send_keys("y")
        assert "confirm jlo" in wait_status("decision")
        browser.refresh()
        assert str(confirmed_id) in [f.get_attribute("data-face-id") for f in faces(".matched .face")]
        assert confirmed_path in find_paths(tmp, g, db, "jlo", "after_confirm.csv")

        # name the largest unknown group: that person exists
        browser.get(f"{base}/groups?token={token}")
        box = browser.find_element(By.CSS_SELECTOR, "form.name-group input[name=name]")
        box.send_keys("<b>blix & co</b>", Keys.ENTER)
        assert "faces named" in wait_status("named")
        assert "<b>blix & co</b>" in set(Gallery.open(g).identities()["identity"])
        browser.get(url)
        named = browser.find_element(By.LINK_TEXT, "<b>blix & co</b>")  # the name as text, never as markup
        assert not browser.find_elements(By.CSS_SELECTOR, "table b")
        named.click()
        assert browser.find_element(By.TAG_NAME, "h1").text == "<b>blix & co</b>" and faces(".matched .face")
    finally:
        browser.quit()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # SIGTERM stops it cleanly


def test_review_security_and_durability(library, lfw_root):
    tmp, g, db = library
    proc, url = start_review(db, g)
    token = url.split("token=")[1]
    try:
        assert status_of(url, "/") == 401
        assert status_of(url, "/thumb/1") == 401
        assert status_of(url, "/?token=wrong") == 403
        assert status_of(url, "/thumb/1", headers={"X-Token": "wrong"}) == 403
        assert status_of(url, f"/?token={token}") == 200
        assert status_of(url, f"/thumb/1?token={token}") == 200
        for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/thumb/..%2f..%2fetc%2fpasswd",
                     "/image/%2Fetc%2Fpasswd", "/thumb/1/../../../etc/passwd", "/person/..%2F..%2Fetc%2Fpasswd",
                     "/person?name=../../etc/passwd&x=1",
                     "/static/../etc/passwd", "/image/999999"):
            assert status_of(url, f"{path}{'&' if '?' in path else '?'}token={token}") == 404, path
        # no change by GET, nor by POST without the header token
        assert status_of(url, f"/decide?token={token}&face_id=1&kind=ignore") == 405
        assert status_of(url, f"/decide?token={token}", "POST", {"Content-Type": "application/json"},
                         json.dumps({"face_id": 1, "kind": "ignore"}).encode()) == 401
        # a scan writes the same index while the app runs: the app answers, and shows the new photo
        new = tmp / "photos" / "late" / "Ricardo_Lagos_0001.jpg"
        copy_photos(new.parent, [lfw_root / "lfw-deepfunneled" / "Ricardo_Lagos" / new.name])
        scan = subprocess.Popen([sys.executable, "-m", "verify", "scan", str(tmp / "photos"), "--gallery", str(g),
                                 "--index", str(db), "--out", str(tmp / "r2.csv"), "--workers", "0", "--device", "cpu"],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while scan.poll() is None:
            assert status_of(url, f"/?token={token}") == 200
            time.sleep(0.2)
        assert scan.returncode == 0
        with Library.open(db, readonly=True) as lib:
            new_id = lib.files([str(new)])[str(new)].id
        assert status_of(url, f"/photo/{new_id}?token={token}") == 200
        before = len(Library.open(db, readonly=True).decisions())
        ack = post(url, "/decide", token, {"face_id": 1, "kind": "ignore"})
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9 right after the answer
        proc.wait(timeout=30)
    log = Library.open(db, readonly=True).decisions()
    assert len(log) == before + 1 and log[-1].id == ack["decision"] and log[-1].kind == "ignore"


def test_a_person_page_narrowed_by_range_search_shows_the_same_faces(library, monkeypatch):
    """Large libraries narrow a person's page to the faces a range search finds; it must show exactly
    what matching every face shows (forced here on the small library)."""
    from verify.review import app as review_app

    tmp, g, db = library
    with Library.open(db, readonly=True) as lib:
        gallery = Gallery.open(g)
        key = lambda faces: [(r["face_id"], r["distance"], r["note"]) for r in faces]  # noqa: E731
        for near_miss in (0.05, 0.3):
            full = review_app.person_faces(review_app.face_rows(lib, gallery), "jlo", near_miss)
            monkeypatch.setattr(review_app, "NARROW_FROM_FACES", 0)
            rows = review_app.face_rows(lib, gallery, person="jlo", near_miss=near_miss)
            monkeypatch.undo()
            narrowed = review_app.person_faces(rows, "jlo", near_miss)
            assert full[0] and key(narrowed[0]) == key(full[0]) and key(narrowed[1]) == key(full[1])
            assert len(rows) < sum(1 for r in review_app.face_rows(lib, gallery))  # it did narrow
