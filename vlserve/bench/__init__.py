"""Benchmarks: `vlserve bench offline` (the engine in-process); prompts and statistics shared with serving ones."""
