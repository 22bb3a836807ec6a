"""Helpers shared by the tests: tiny models, local tokenizers and synthetic batches (no hub)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root (configs/, examples/, README.md)."""
