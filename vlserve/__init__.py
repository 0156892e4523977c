"""vlserve: serve Qwen2.5-VL from one GPU to many machines."""

__version__ = "0.1.0"
