"""Qwen2.5-VL: vision tower and language model, built from tensor-parallel-ready layers."""
