"""Helpers shared by the chapters of the book (d2l's habit: the chapters import them, never
re-define them). Torch-free.
"""

from __future__ import annotations
