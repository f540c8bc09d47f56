"""Courier's Feast feature repository (definitions in `definitions.py`)."""
