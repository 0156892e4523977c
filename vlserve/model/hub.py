"""A Hugging Face model name (`vlserve serve Qwen/Qwen2.5-VL-7B-Instruct`) -> a checkpoint folder.

Looked up in the hub's cache first (HF_HOME's, or --download-dir's), laid out as huggingface_hub writes it; else
downloaded with huggingface_hub (only the files vlserve reads) where the network allows; else a ConfigError with
the command that fetches it. The folder then goes through the same checks as any other.
"""

import logging
import re
from dataclasses import replace

from vlserve.config import EngineConfig, is_hub_name
from vlserve.errors import ConfigError

log = logging.getLogger("vlserve.model")
# What vlserve reads from a checkpoint: config, weights, tokenizer, chat and preprocessing templates
FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]


def fetched(config: EngineConfig) -> EngineConfig:
    """`config` with its model (and --tokenizer) as folders: a Hugging Face name resolved in the cache, or
    downloaded. The engine's first step, before the plan (`vlserve plan` reads public layouts by name instead)."""
    changes = {field: snapshot_folder(name, config.download_dir) for field, name in
               (("model", config.model), ("tokenizer", config.tokenizer))
               if name is not None and is_hub_name(name)}
    return replace(config, **changes) if changes else config


def snapshot_folder(name: str, download_dir: str | None = None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, cache_dir=download_dir, local_files_only=True)
    except HFValidationError as e:
        raise ConfigError(f"model {name!r} is neither a folder nor a Hugging Face model name ({e})") from e
    except LocalEntryNotFoundError:
        pass
    log.warning("model %s is not in the Hugging Face cache%s: downloading it", name,
                f" at {download_dir}" if download_dir else "")
    try:
        return snapshot_download(name, cache_dir=download_dir, allow_patterns=FILES)
    except Exception as e:  # offline (HF_HUB_OFFLINE, no route), unknown or gated repository
        cache, flag = (f" at {download_dir}", f" --cache-dir {download_dir}") if download_dir else ("", "")
        reason = re.split(r"(?<=[.!])\s", str(e).strip())[0][:300]
        raise ConfigError(f"model {name!r} is not a folder here nor in the Hugging Face cache{cache}, and could not "
                          f"be downloaded ({type(e).__name__}: {reason}); fetch it where the network allows with "
                          f"`hf download {name}{flag}`, then pass the same --download-dir (or a checkpoint folder)"
                          ) from e
