"""Benchmark rows to CSV, shared by the bench scripts (one column layout per file, never mixed)."""
from __future__ import annotations

import csv
import os
from datetime import datetime
from typing import Dict, Sequence


def write_csv(rows: Sequence[Dict], path: str) -> str:
    """Append ``rows`` to ``path`` (header when new); a file with other columns is left alone and the
    rows go to ``<path>_<timestamp>`` instead. Returns the path written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(rows[0])
    if os.path.exists(path):
        with open(path, newline="") as f:
            if next(csv.reader(f), None) != fields:
                root, ext = os.path.splitext(path)
                path = f"{root}_{datetime.now().strftime('%Y%m%d_%H%M%S')}{ext}"
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
