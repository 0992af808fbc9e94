"""Puts the repository root on sys.path so tests import the flat modules (trainers, utils, ...)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
