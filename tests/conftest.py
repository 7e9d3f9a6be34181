"""Shared pytest setup: make the project's single-file modules (gpt.py, train.py, bpe.py, ...) importable from tests/."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
