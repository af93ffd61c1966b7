"""Writes a report: JSON next to its PNG plot (same name, other suffix)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_path(kind: str) -> Path:
    """bench/results/<kind>-<local time>.json"""
    return RESULTS_DIR / f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def write_report(report: dict, json_path: Path, plot: Callable[[dict, Path], None]) -> Path:
    """Writes the JSON and `plot(report, png_path)`; returns the PNG's path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    png_path = json_path.with_suffix(".png")
    plot(report, png_path)
    return png_path
