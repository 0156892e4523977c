"""Layers shared by the vision tower and the language model."""
