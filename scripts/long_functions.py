"""Functions and modules longer than a reader holds in mind: the house's rule of thumb, measured.

    python scripts/long_functions.py [--over 80] [--module-over 400] [FOLDER ...]   (default: verify index bench)

Prints a Markdown table of every function (methods and nested functions included) of more than `--over`
lines, longest first, then the modules of more than `--module-over` lines. Lines are counted from the
`def` line to the last line of the body (docstring and comments included), as a reader scrolls them.
Reads the files as text (ast); imports nothing from the project.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((child.end_lineno - child.lineno + 1, name))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, default=[Path("verify"), Path("index"), Path("bench")])
    ap.add_argument("--over", type=int, default=80, help="list functions longer than this many lines")
    ap.add_argument("--module-over", type=int, default=400, help="list modules longer than this many lines")
    args = ap.parse_args(argv)

    files = sorted(p for folder in args.folders for p in folder.rglob("*.py"))
    if not files:
        print(f"no Python files under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    long_functions = sorted(((n, f"{p}:{name}") for p in files for n, name in function_lengths(p) if n > args.over),
                            reverse=True)
    long_modules = sorted(((len(p.read_text(encoding="utf-8").splitlines()), str(p)) for p in files), reverse=True)
    long_modules = [(n, p) for n, p in long_modules if n > args.module_over]

    print(f"{len(files)} modules; {len(long_functions)} functions over {args.over} lines, "
          f"{len(long_modules)} modules over {args.module_over} lines\n")
    print("| lines | function |\n|---:|---|")
    for n, where in long_functions:
        print(f"| {n} | {where} |")
    print("\n| lines | module |\n|---:|---|")
    for n, where in long_modules:
        print(f"| {n} | {where} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
