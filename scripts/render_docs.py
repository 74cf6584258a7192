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
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<cmd>[^\n]*?) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated blocks."""
    return sorted((root / "docs").glob("*.md")) + [root / "README.md"]


def render_command(cmd: str, root: Path = ROOT) -> str:
    """The output of one block's command; it must be a ``scripts/*.py`` of this repository."""
    argv = shlex.split(cmd)
    if not argv or not re.fullmatch(r"scripts/[\w.-]+\.py", argv[0]):
        raise SystemExit(f"generated block command must start with scripts/NAME.py, got: {cmd}")
    out = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"`{cmd}` failed:\n{out.stderr[-2000:]}")
    return out.stdout if out.stdout.endswith("\n") else out.stdout + "\n"


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
