"""Shared test setup: import the package from the checkout and keep torch to the 2 CPU cores."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
