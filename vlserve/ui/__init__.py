"""A browser chat page for any OpenAI-compatible server (vlserve's own, mounted at /ui, or standalone)."""

from vlserve.errors import ConfigError

try:
    import gradio  # noqa: F401
    import openai  # noqa: F401
except ImportError as e:  # say what to do instead of a bare traceback from `vlserve serve`
    raise ConfigError(f"the chat page needs gradio and openai ({e}): pip install gradio openai, "
                      "or run `vlserve serve --disable-ui`") from e

from vlserve.ui.app import mount_ui, run_ui  # noqa: E402
from vlserve.ui.chat_page import build_chat_page  # noqa: E402

__all__ = ["build_chat_page", "mount_ui", "run_ui"]
