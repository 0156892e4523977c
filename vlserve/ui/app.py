"""Serving the chat page: mounted inside vlserve's FastAPI app at /ui, or on its own (`vlserve ui`)."""

import hmac

import gradio as gr

from vlserve.ui.chat_page import build_chat_page


def mount_ui(fastapi_app, api_base: str, api_key: str | None, model: str | None = None, path: str = "/ui"):
    """`api_base` is the server's own /v1 URL as the page's backend reaches it (loopback is fine): the page
    calls the API over HTTP like any client, so API-key checks, limits and aborts behave the same.
    The page holds the key, so with a key set it asks for it at a login (any user name) before anyone chats."""
    auth = None
    if api_key:
        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    return gr.mount_gradio_app(fastapi_app, build_chat_page(api_base, api_key, model), path=path, auth=auth,
                               auth_message="Log in with the server's API key as the password (any user name).")


def run_ui(api_base: str, api_key: str | None, host: str = "127.0.0.1", port: int = 7860,
           model: str | None = None) -> None:
    """Gradio's own lines (and its `share=True` hint: a public tunnel is not how vlserve is reached) stay quiet."""
    print(f"chat page on http://{host}:{port}/ against {api_base}", flush=True)
    build_chat_page(api_base, api_key, model).launch(server_name=host, server_port=port, show_error=True, quiet=True)
