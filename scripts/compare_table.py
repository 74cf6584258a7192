"""Print the Markdown table of a `mimkit compare` result file (its compare.json), for a generated block in docs/.

.venv/bin/python scripts/compare_table.py docs/ablations/coma_sample_images.json
"""

from __future__ import annotations

import json
import sys

from mimkit.compare import markdown_table

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown_table(json.load(f)))
