"""Regenerate the generated blocks of the Markdown documents from the result files kept next to them.

A generated block names the command that prints it (a script of this repository and its arguments, run from the
repository root with the same Python):

    <!-- BEGIN GENERATED: scripts/reference_ratios.py docs/benchmarks/side_by_side.log --markdown -->
    ...
    <!-- END GENERATED -->

    .venv/bin/python scripts/render_docs.py            # rewrite every block of docs/*.md and README.md
    .venv/bin/python scripts/render_docs.py --check    # exit 1 naming each stale block (tests/test_generated_docs.py)

`make docs` runs the first; `make bench` measures (writing the result files) and then renders.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<cmd>[^\n]*?) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated blocks."""
    return sorted((root / "docs").glob("*.md")) + [root / "README.md"]


def render_command(cmd: str, root: Path = ROOT) -> str:
    """The output of one block's command; it must be a ``scripts/*.py`` of this repository. Run in this process
    as ``__main__`` (as ``python SCRIPT ARGS`` from ``root`` would run it), so that the heavy imports the scripts
    share are paid once for all blocks."""
    argv = shlex.split(cmd)
    if not argv or not re.fullmatch(r"scripts/[\w.-]+\.py", argv[0]):
        raise SystemExit(f"generated block command must start with scripts/NAME.py, got: {cmd}")
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, list(sys.path), os.getcwd()
    sys.argv, sys.path[0:0] = argv, [str(root / "scripts")]
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(root / argv[0]), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise SystemExit(f"`{cmd}` failed ({stop.code}):\n{err.getvalue()[-2000:]}") from None
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.chdir(saved[2])
    text = out.getvalue()
    return text if text.endswith("\n") else text + "\n"


def render(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """(the text with every block regenerated, the commands of the blocks that changed)."""
    changed = []

    def one(m: re.Match) -> str:
        body = render_command(m.group("cmd"), root)
        if body != m.group("body"):
            changed.append(m.group("cmd"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    a = ap.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        new, changed = render(text)
        stale += [f"{path.relative_to(ROOT)}: {cmd}" for cmd in changed]
        if changed and not a.check:
            path.write_text(new)
    if a.check and stale:
        print("stale generated blocks (run `make docs`):\n" + "\n".join(stale))
        return 1
    for line in stale:
        print(f"regenerated {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
