"""scripts/long_functions.py: functions and modules past the house's rule of thumb, counted from the source."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import long_functions  # noqa: E402


def module_with(tmp_path: Path) -> Path:
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    source = textwrap.dedent('''\
        class Index:
            def build(self):
                def step():
                    return 1
                return step()


        def short():
            return 0


        def long():
        ''') + body + "\n    return x0\n"
    path = tmp_path / "pkg" / "mod.py"
    path.parent.mkdir()
    path.write_text(source)
    return path


def test_lengths_count_def_to_last_line_with_qualified_names(tmp_path):
    lengths = dict((name, n) for n, name in long_functions.function_lengths(module_with(tmp_path)))
    assert lengths == {"Index.build": 4, "Index.build.step": 2, "short": 2, "long": 87}


def test_report_lists_only_what_is_over_the_limits(tmp_path, capsys):
    path = module_with(tmp_path)
    assert long_functions.main([str(tmp_path / "pkg"), "--over", "80", "--module-over", "50"]) == 0
    out = capsys.readouterr().out
    assert f"| 87 | {path}:long |" in out
    assert "short" not in out and "Index.build" not in out
    assert f"| {len(path.read_text().splitlines())} | {path} |" in out
    assert long_functions.main([str(tmp_path / "pkg"), "--over", "90", "--module-over", "500"]) == 0
    out = capsys.readouterr().out
    assert "0 functions over 90 lines, 0 modules over 500 lines" in out and ":long" not in out
