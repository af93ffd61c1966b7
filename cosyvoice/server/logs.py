"""Log setup: service messages as text lines on stderr, access logs as one JSON object a line
on stdout (logger `cosyvoice.access`), ready for a log collector."""
from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("cosyvoice.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
