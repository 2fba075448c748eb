"""A run's log files as written: ``metrics.jsonl`` (one JSON object per line), read by the
training loop on resume and by ``export`` for the model card. No diffuse imports, so both can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue   # a line cut short by a crash
    return rows
