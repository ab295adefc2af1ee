"""Walking folder trees for a scan: every directory entry to report, in a deterministic order.

Each folder is walked recursively in sorted order (names sorted per directory, files of a directory
before its subdirectories), so two scans of the same tree list the same files in the same order.
Symbolic links to folders are NOT followed (that rules out symlink loops and double counting); each
gets a "skipped" row saying so. Symbolic links to files are read like files. A folder argument that
is a file is scanned as that one file; files reached twice (overlapping folders) are reported once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterable, Sequence

from verify.faces import error_summary


class ScanError(RuntimeError):
    """A scan that cannot start or resume; the message is one line meant for the user."""


def report_text(s: str) -> str:
    """File names need not be valid UTF-8 (they arrive as surrogate escapes); reports must be:
    an undecodable byte is shown as a backslash escape of that byte (b"\xe9" -> "\\xe9")."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(s).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class WalkEntry:
    path: str  # the report's path string (absolute, UTF-8 safe)
    fs_path: str  # what to open
    status: str | None = None  # set when the walk already decides the row (skipped / error)
    error: str | None = None
    stat: tuple[int, int, int, int] | None = None  # (size, mtime_ns, ctime_ns, inode): the change signature


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _classify(fs_path: str) -> tuple[str | None, str | None, tuple[int, int, int, int] | None]:
    """(status, error, stat signature) decided without opening the file; status None: a file to decode."""
    try:
        st = os.stat(fs_path)  # follows symlinks
    except OSError as exc:
        if os.path.islink(fs_path):
            return "error", "broken symbolic link", None
        return "error", f"cannot read file ({exc.strerror or error_summary(exc)})", None
    sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if stat.S_ISDIR(st.st_mode):
        return "skipped", "symbolic link to a folder (not followed)", sig
    if not stat.S_ISREG(st.st_mode):
        return "skipped", f"not a regular file ({_kind_of(st.st_mode)})", sig  # a fifo would block a reader
    return None, None, sig


def walk_files(folders: Sequence[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()) -> list[WalkEntry]:
    """Every entry to report under `folders`, in deterministic (sorted, top-down) order."""
    excluded = {os.path.abspath(p) for p in exclude}
    seen: set[str] = set()
    entries: list[WalkEntry] = []

    def add(fs_path: str, status: str | None = None, error: str | None = None) -> None:
        if fs_path in seen or fs_path in excluded:
            return
        seen.add(fs_path)
        sig = None
        if status is None:
            status, error, sig = _classify(fs_path)
        entries.append(WalkEntry(report_text(fs_path), fs_path, status, error, sig))

    for folder in folders:
        top = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(top):
            if os.path.lexists(top):
                add(top)  # a file given directly
                continue
            raise ScanError(f"{folder}: no such folder")

        def unreadable(exc: OSError) -> None:
            name = exc.filename if isinstance(exc.filename, str) else top
            add(os.path.abspath(name), "error", f"cannot list folder ({exc.strerror or error_summary(exc)})")

        for root, dirs, names in os.walk(top, followlinks=False, onerror=unreadable):
            linked = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = sorted(d for d in dirs if d not in linked)  # walk real subfolders, sorted
            for name in sorted(names + linked):
                add(os.path.join(root, name))
    return entries
