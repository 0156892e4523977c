"""Engine deltas -> OpenAI responses: whole (non-streaming) or as server-sent events."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from vlserve.engine.outputs import RequestOutput
from vlserve.engine.sampler import Logprob
from vlserve.serve.errors import status_of
from vlserve.serve.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatMessage, ChoiceLogprobs,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, DeltaMessage, FunctionCall,
    PromptLogprob, PromptLogprobs, StreamOptions, TokenLogprob, ToolCallOut, TopLogprob, Usage, error_json, new_id,
)
from vlserve.serve.tools import ChoiceTools, ToolMode, tool_finish_reason, whole_choice


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details={"cached_tokens": cached_tokens})


def sse(payload) -> str:
    """One server-sent event. A chunk holds the fields set on it: `finish_reason` and `logprobs` always (null until
    known, as OpenAI and vLLM send them), a delta's `role` only in its first chunk, `usage` only where asked for."""
    if hasattr(payload, "model_dump_json"):
        body = payload.model_dump_json(exclude_unset=True)
    else:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {body}\n\n"


class TokenText:
    """Token ids -> the strings OpenAI's logprobs carry (decoded text and its UTF-8 bytes), or with `as_ids`
    "token_id:42" (vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])

    def top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def chat(self, token_ids: list[int], logprobs: list[Logprob] | None) -> ChoiceLogprobs | None:
        if logprobs is None:
            return None
        content = []
        for token_id, lp in zip(token_ids, logprobs):
            top = self.top(token_id, lp.logprob)
            content.append(TokenLogprob(**top.model_dump(), top_logprobs=[self.top(t, p) for t, p in lp.top]))
        return ChoiceLogprobs(content=content)

    def completion(self, token_ids: list[int], logprobs: list[Logprob | None] | None, offset: int,
                   count: int | None = None) -> CompletionLogprobs | None:
        """OpenAI's legacy form: per token its text, logprob, offset and the `logprobs` most likely tokens plus the
        sampled one (so `logprobs: 0` gives the sampled token alone). A None entry (the prompt's first token, with
        echo) has no logprob; `count` cuts the top entries (prompt logprobs may hold more)."""
        if logprobs is None:
            return None
        tokens, chosen, top, offsets = [], [], [], []
        for token_id, lp in zip(token_ids, logprobs):
            text = self.text(token_id)
            tokens.append(text)
            chosen.append(None if lp is None else lp.logprob)
            top.append(None if lp is None else {self.text(t): p for t, p in lp.top[:count]} | {text: lp.logprob})
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=chosen, top_logprobs=top, text_offset=offsets)

    def prompt(self, token_ids: list[int], logprobs: list[Logprob | None] | None) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs: per position the prompt token's entry and the most likely ones (rank 1 first)."""
        if logprobs is None:
            return None
        out = []
        for token_id, lp in zip(token_ids, logprobs):
            if lp is None:
                out.append(None)
                continue
            entries = {str(t): PromptLogprob(logprob=p, rank=r, decoded_token=self.text(t))
                       for r, (t, p) in enumerate(lp.top, 1)}
            ranks = [r for r, (t, _) in enumerate(lp.top, 1) if t == token_id]
            out.append({str(token_id): PromptLogprob(logprob=lp.logprob, rank=ranks[0] if ranks else None,
                                                     decoded_token=self.text(token_id))} | entries)
        return out


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, delta) from several engine requests as they arrive; closing this closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]):
            async for delta in streams[0]:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put((i, delta))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # cancelling a pump closes its stream, which aborts that engine request
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Accumulate each engine request's deltas into its final output."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, delta in merged(streams):
        if finals[i] is None:
            finals[i] = RequestOutput.start(delta)
        finals[i].add(delta)
    return finals


def chat_response(final: RequestOutput, model: str, token_text: TokenText,
                  mode: ToolMode = ToolMode()) -> ChatCompletionResponse:
    choices = []
    for o in final.outputs:
        content, calls, chose = whole_choice(o.text, mode)
        calls_out = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in calls]
        choices.append(ChatChoice(index=o.index, message=ChatMessage(content=content, tool_calls=calls_out),
                                  finish_reason=tool_finish_reason(chose, o.finish_reason),
                                  logprobs=token_text.chat(o.token_ids, o.logprobs)))
    completion = sum(len(o.token_ids) for o in final.outputs)
    return ChatCompletionResponse(model=model, choices=choices,
                                  usage=usage(len(final.prompt_token_ids), completion, final.num_cached_tokens),
                                  prompt_logprobs=token_text.prompt(final.prompt_token_ids, final.prompt_logprobs))


def completion_response(finals: list[RequestOutput], model: str, n: int, token_text: TokenText,
                        echoes: list[str], req: CompletionRequest) -> CompletionResponse:
    """`echoes`: per prompt, the text put before each of its choices (the prompt itself with `echo`, else "");
    with logprobs too, the prompt's tokens lead the choice's logprobs."""
    choices, prompt_tokens, completion, cached = [], 0, 0, 0
    for i, final in enumerate(finals):  # OpenAI numbers choices prompt-major: prompt i, sample j -> i * n + j
        prompt_tokens += len(final.prompt_token_ids)
        cached += final.num_cached_tokens
        # asked for, not only computed for echo's logprobs
        prompt_logprobs = (token_text.prompt(final.prompt_token_ids, final.prompt_logprobs)
                           if req.prompt_logprobs is not None else None)
        for o in final.outputs:
            completion += len(o.token_ids)
            logprobs = token_text.completion(o.token_ids, o.logprobs, len(echoes[i]))
            if req.echo and logprobs is not None:
                logprobs = token_text.completion(final.prompt_token_ids, final.prompt_logprobs, 0,
                                                 req.logprobs) + logprobs
            choices.append(CompletionChoice(index=i * n + o.index, text=echoes[i] + o.text,
                                            finish_reason=o.finish_reason, logprobs=logprobs,
                                            prompt_logprobs=prompt_logprobs))
    return CompletionResponse(model=model, choices=choices, usage=usage(prompt_tokens, completion, cached))


def usage_modes(options: StreamOptions | None) -> tuple[bool, bool]:
    """(usage at the end, usage in every chunk): stream_options.include_usage, and continuous_usage_stats with it."""
    final = bool(options and options.include_usage)
    return final, final and options.continuous_usage_stats


async def chat_stream(stream: AsyncIterator[RequestOutput], model: str, n: int, options: StreamOptions | None,
                      token_text: TokenText, mode: ToolMode = ToolMode()) -> AsyncIterator[str]:
    """SSE: a role chunk per choice, content (or tool-call) deltas, a finish chunk per choice, optional usage,
    [DONE]."""
    rid, created = new_id("chatcmpl"), int(time.time())
    tools = [ChoiceTools(mode) for _ in range(n)]
    final_usage, every_chunk = usage_modes(options)
    prompt_tokens = completion = cached = 0

    def chunk(choices, last: bool = False) -> str:
        shown = {"usage": usage(prompt_tokens, completion, cached)} if last or every_chunk else {}
        return sse(ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=model,
                                       choices=choices, **shown))

    for i in range(n):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""), logprobs=None,
                                     finish_reason=None)])
    try:
        async for _, delta in merged([stream]):
            prompt_tokens, cached = len(delta.prompt_token_ids), delta.num_cached_tokens
            for o in delta.outputs:
                completion += len(o.token_ids)
                text, calls = (o.text, None) if not mode.calls_tools else tools[o.index].feed(
                    o.text, o.finish_reason is not None)
                if text or calls or o.finish_reason or o.logprobs:
                    fields = {"content": text} if text or not calls else {}  # only the fields set are sent
                    message = DeltaMessage(**fields, **({"tool_calls": calls} if calls else {}))
                    yield chunk([ChatChunkChoice(index=o.index, delta=message,
                                                 finish_reason=tools[o.index].finish_reason(o.finish_reason),
                                                 logprobs=token_text.chat(o.token_ids, o.logprobs))])
    except Exception as e:  # the engine failed or refused mid-stream: tell the client in-band, then end
        yield sse(error_event(e))
    else:
        if final_usage:
            yield chunk([], last=True)
    yield "data: [DONE]\n\n"


async def completion_stream(streams: list[AsyncIterator[RequestOutput]], model: str, n: int,
                            options: StreamOptions | None, token_text: TokenText, echoes: list[str]
                            ) -> AsyncIterator[str]:
    """SSE: with `echo`, each choice's first chunk opens with its prompt's text."""
    rid, created = new_id("cmpl"), int(time.time())
    echoed: set[int] = set()
    final_usage, every_chunk = usage_modes(options)
    prompts, cached, completion = {}, {}, 0  # per prompt (stream index)

    def chunk(choices, last: bool = False) -> str:
        counts = usage(sum(prompts.values()), completion, sum(cached.values()))
        return sse(CompletionResponse(id=rid, object="text_completion", created=created, model=model,
                                      choices=choices, **({"usage": counts} if last or every_chunk else {})))

    try:
        async for i, delta in merged(streams):
            prompts[i], cached[i] = len(delta.prompt_token_ids), delta.num_cached_tokens
            for o in delta.outputs:
                completion += len(o.token_ids)
                index = i * n + o.index
                prefix = "" if index in echoed else echoes[i]
                echoed.add(index)
                yield chunk([CompletionChoice(index=index, text=prefix + o.text, finish_reason=o.finish_reason,
                                              logprobs=token_text.completion(o.token_ids, o.logprobs, 0))])
    except Exception as e:  # the engine failed mid-stream: tell the client in-band, then end
        yield sse(error_event(e))
    else:
        if final_usage:
            yield chunk([], last=True)
    yield "data: [DONE]\n\n"


def error_event(e: Exception) -> dict:
    status, kind = status_of(e)
    return error_json(status, str(e), kind)
