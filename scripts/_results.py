"""The line protocol of the measuring scripts' own processes: every measurement runs in a process of its own (so that
memory and allocator state are its own) and prints its result as one ``RESULT {json}`` line, the format of the shared
side-by-side tool (``../shared/tools/side_by_side.py``); the parent, or a script reading a saved log, reads them back.
What a parent does when a child prints no result (stop, skip the row, record the error) stays its own."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable

PREFIX = "RESULT "


def result_line(result: dict) -> str:
    return PREFIX + json.dumps(result)


def print_result(result: dict) -> None:
    print(result_line(result), flush=True)


def results_in(lines: str | Iterable[str]) -> list[dict]:
    """The results among ``lines`` (a text or its lines), in order; other lines are passed over."""
    lines = lines.splitlines() if isinstance(lines, str) else lines
    return [json.loads(line[len(PREFIX) :]) for line in lines if line.startswith(PREFIX)]


def run_for_result(cmd: list[str], **kwargs) -> tuple[dict | None, subprocess.CompletedProcess]:
    """``cmd`` in its own process (output captured as text): its first result, None if it printed none, and the
    finished process (for its stderr and exit code)."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    found = results_in(done.stdout)
    return (found[0] if found else None), done
