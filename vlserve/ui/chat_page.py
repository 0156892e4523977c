"""The chat page: text plus several images/videos per turn, streamed answers, Stop, Regenerate, Clear.

History is kept as plain `Turn`s (the raw text and the media parts exactly as sent), never read back from what
the Chatbot renders, so later turns resend what the model saw and nothing Gradio added.
"""

import asyncio
import base64
import mimetypes
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import openai

MEDIA_KINDS = {"image": "image_url", "video": "video_url"}
RANDOM_WEIGHTS_NOTE = ("**This model's weights are random** (the demo checkpoint, `vlserve make-tiny`, or "
                       "`--load-format dummy`): its answers are noise. To chat for real, serve a Qwen2.5-VL "
                       "checkpoint: `vlserve serve Qwen/Qwen2.5-VL-3B-Instruct`.")
# A fast model streams hundreds of tokens a second; re-rendering the growing answer for each would swamp the
# browser (its buttons then stop answering clicks), so the page shows at most this many frames a second.
FRAME_S = 1 / 20
CANCEL_WAIT_S = 10  # how long Stop, Clear and Regenerate wait for a cancelled answer to end, at most


@dataclass
class Turn:
    text: str
    files: list[str] = field(default_factory=list)  # upload paths, only to show the media in the chat
    parts: list[dict] = field(default_factory=list)  # image_url / video_url parts with data: URLs, as sent
    answer: str = ""
    error: str | None = None  # a failed turn is shown but never resent: it would fail again (e.g. oversize image)


def media_part(path: str) -> dict:
    """An OpenAI content part carrying the file inline as a data: URL (the server reads no local paths)."""
    mime = mimetypes.guess_type(path)[0] or ""
    kind = MEDIA_KINDS.get(mime.split("/")[0])
    if kind is None:
        raise gr.Error(f"{Path(path).name}: not an image or a video (type {mime or 'unknown'})")
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": kind, kind: {"url": f"data:{mime};base64,{data}"}}


def user_content(turn: Turn) -> str | list[dict]:
    if not turn.parts:
        return turn.text
    # media first, then the question: the order Qwen2.5-VL's examples use
    return [*turn.parts, {"type": "text", "text": turn.text}]


def to_messages(system: str, turns: list[Turn]) -> list[dict]:
    """OpenAI messages that ask `turns[-1]` again: its old answer (if any) is dropped, failed turns are skipped."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for turn in turns[:-1]:
        if turn.error is None:
            messages += [{"role": "user", "content": user_content(turn)},
                         {"role": "assistant", "content": turn.answer}]
    return messages + [{"role": "user", "content": user_content(turns[-1])}]


def error_text(exc: openai.APIError) -> str:
    """One readable line from an OpenAI error JSON body (or a connection failure), never a traceback."""
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {exc.request.url}: {exc.message}"
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or exc.message
    status = getattr(exc, "status_code", None)  # None for an error sent inside the stream
    where = " ".join(str(x) for x in (status, body.get("type")) if x)
    return f"server error ({where}): {message}" if where else f"server error: {message}"


def chat_view(turns: list[Turn]) -> list[dict]:
    """What the Chatbot shows; derived from the plain history each time, never the other way round."""
    view = []
    for turn in turns:
        view.append({"role": "user", "content": [*({"path": f} for f in turn.files), turn.text]})
        shown = turn.answer + (f"\n\n⚠️ {turn.error}" if turn.error else "")
        if shown:
            view.append({"role": "assistant", "content": shown.strip()})
    return view


@dataclass
class Backend:
    api_base: str
    api_key: str | None
    model: str | None = None  # None: the first one the server lists, looked up on first use
    random_weights: bool = False  # the server says its weights are random (vlserve's /v1/models field)

    def __post_init__(self):
        # openai requires some key; a server started without --api-key ignores it. No retries: a retried
        # request would generate twice, and the user should see the error at once.
        self.client = openai.AsyncOpenAI(base_url=self.api_base, api_key=self.api_key or "none", max_retries=0)

    async def model_name(self) -> str:
        if self.model is None:
            await self.look_up()
        if self.model is None:
            raise gr.Error(f"{self.api_base} lists no models")
        return self.model

    async def look_up(self) -> None:
        """The model's card, lazily (when mounted, the page is built before its own server listens): its name when
        none was given, and whether its weights are random."""
        models = (await self.client.models.list()).data
        card = next((m for m in models if m.id == self.model), models[0] if models else None)
        if card is not None:
            self.model, self.random_weights = card.id, getattr(card, "random_weights", None) is True

    async def header(self) -> str:
        try:
            await self.look_up()
            model = f"`{self.model}`" if self.model else "(no model: the server lists none)"
        except openai.APIError as e:
            model = f"(no model: {error_text(e)})"
        header = f"Chatting with {model} at `{self.api_base}`"
        return f"{header}\n\n{RANDOM_WEIGHTS_NOTE}" if self.random_weights else header

    async def stream(self, messages: list[dict], temperature: float, top_p: float,
                     max_tokens: int | None) -> AsyncIterator[str]:
        """Text deltas. Leaving early (Stop cancels the task awaiting us) closes the HTTP stream, which is how
        the server learns to abort the request and free its KV blocks."""
        stream = await self.client.chat.completions.create(
            model=await self.model_name(), messages=messages, stream=True,
            temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content


class Answering:
    """The task streaming each browser session's answer. Stop, Clear and Regenerate cancel it through Gradio
    (`cancels=`), a request that races their own handler's; each handler first waits here for the old answer
    to end, else its last frames could land after the handler's reply and undo it, on screen and in history."""

    def __init__(self):
        self.tasks = weakref.WeakValueDictionary()  # finished tasks drop out by themselves

    def start(self, session: str) -> None:
        self.tasks[session] = asyncio.current_task()

    async def ended(self, session: str) -> None:
        task = self.tasks.get(session)
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait([task], timeout=CANCEL_WAIT_S)


def build_chat_page(api_base: str, api_key: str | None, model: str | None = None) -> gr.Blocks:
    backend, answering = Backend(api_base, api_key, model), Answering()

    def add_turn(value: dict, turns: list[Turn]):
        files = value.get("files") or []
        if not value.get("text", "").strip() and not files:
            raise gr.Error("Type a question or attach an image or video first.")
        turns = [*turns, Turn(value["text"], files, [media_part(f) for f in files])]
        return chat_view(turns), turns, gr.MultimodalTextbox(value=None, interactive=False)

    async def ask(turns: list[Turn], system: str, temperature: float, top_p: float, max_tokens: float,
                  request: gr.Request):
        await answering.ended(request.session_hash)
        answering.start(request.session_hash)
        if not turns:
            yield [], turns, gr.MultimodalTextbox(interactive=True)
            return
        turn = replace(turns[-1], answer="", error=None)
        turns = [*turns[:-1], turn]
        messages = to_messages(system or "", turns)  # an untouched Textbox gives None
        limit = None if max_tokens is None else int(max_tokens)  # an emptied field: the server's default
        yield chat_view(turns), turns, gr.MultimodalTextbox(interactive=False)
        shown = time.monotonic()
        try:
            async for delta in backend.stream(messages, temperature, top_p, limit):
                turn.answer += delta
                if time.monotonic() - shown >= FRAME_S:  # the rest shows with the next frame, or the last below
                    shown = time.monotonic()
                    yield chat_view(turns), turns, gr.skip()
        except openai.APIError as e:
            turn.error = error_text(e)
        yield chat_view(turns), turns, gr.MultimodalTextbox(interactive=True)

    async def stop(request: gr.Request):
        await answering.ended(request.session_hash)
        return gr.MultimodalTextbox(interactive=True)

    async def clear(request: gr.Request):
        await answering.ended(request.session_hash)
        return [], [], gr.MultimodalTextbox(value=None, interactive=True)

    with gr.Blocks(title="vlserve chat", analytics_enabled=False) as page:
        header = gr.Markdown(f"Chatting with `{model or '…'}` at `{api_base}`")
        chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chat", feedback_options=None,
                             buttons=["copy", "copy_all"])  # no share button: it needs Hugging Face
        box = gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple", elem_id="ask",
                                   show_label=False, placeholder="Ask; attach images or videos with the clip")
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="stop")
            regen_button = gr.Button("Regenerate", elem_id="regenerate")
            clear_button = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(label="System prompt", lines=2, elem_id="system")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top_p")
            max_tokens = gr.Number(1024, label="Max tokens", minimum=1, precision=0, elem_id="max-tokens")
        turns = gr.State([])

        inputs, outputs = [turns, system, temperature, top_p, max_tokens], [chatbot, turns, box]
        # concurrency_limit=None: Gradio runs one event per listener at a time by default, which would make
        # every visitor wait for the others; the server batches, so let them all stream at once.
        free = {"concurrency_limit": None}
        asked = box.submit(add_turn, [box, turns], outputs).success(ask, inputs, outputs, **free)
        # Cancelling is a step of its own, before the handler: the page runs an event's handler to the end and
        # only then its `cancels`, so a handler waiting for the old answer to end would wait for its timeout.
        reasked = regen_button.click(None, cancels=[asked]).then(ask, inputs, outputs, **free)
        running = [asked, reasked]
        stop_button.click(None, cancels=running).then(stop, None, box, **free)
        for emptied in (clear_button.click, chatbot.clear):  # our button and the Chatbot's own trash icon
            emptied(None, cancels=running).then(clear, None, outputs, **free)
        page.load(backend.header, None, header)
    return page
