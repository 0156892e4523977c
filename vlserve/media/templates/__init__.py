"""Chat templates vlserve ships (package data): Qwen2.5-VL's own plus tool calling."""

from pathlib import Path

TOOLS_TEMPLATE = Path(__file__).parent / "qwen2_5_vl_tools.jinja"
