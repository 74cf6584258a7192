"""Generated blocks in docs/ and README are what their commands print from the stored result files (the CI check for
stale generated documents, through the real script)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from render_docs import render  # noqa: E402


def test_no_generated_block_is_stale():
    out = subprocess.run(
        [sys.executable, "scripts/render_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_stale_block_is_found_and_rewritten():
    cmd = "scripts/compare_table.py docs/ablations/coma_sample_images.json"
    text = f"intro\n<!-- BEGIN GENERATED: {cmd} -->\n| an old table |\n<!-- END GENERATED -->\nafter\n"
    new, changed = render(text, ROOT)
    assert changed == [cmd]
    assert "| an old table |" not in new and "coma_dyvit_pico_128:mode=pair" in new and new.endswith("after\n")
    assert render(new, ROOT)[1] == []  # rendering again changes nothing
