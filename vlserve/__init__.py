"""vlserve: serve Qwen2.5-VL from one GPU to many machines.

`from vlserve import LLM, SamplingParams` for offline use, `AsyncEngine` for servers. Imported lazily, so the
command line starts without loading torch until a command needs it.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "AsyncEngine"]


def __getattr__(name: str):
    if name == "LLM":
        from vlserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from vlserve.engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "AsyncEngine":
        from vlserve.engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(f"module 'vlserve' has no attribute {name!r}")
