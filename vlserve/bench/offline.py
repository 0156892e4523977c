"""`vlserve bench offline`: throughput and latency of LLMEngine in-process, as vLLM's `bench throughput`.

All requests are submitted at once and the engine steps until every one is done, so the figures are the engine's
throughput with a full queue. TTFT counts from submission, so it includes waiting behind earlier requests.
Prompts are built (tokens, image preprocessing) before the clock starts; vision encoding runs inside the steps.
"""

import time
from dataclasses import asdict

from tqdm import tqdm

from vlserve.bench.prompts import Workload, engine_inputs, make_prompts
from vlserve.bench.stats import BenchSummary, RequestTiming, report, summarize, write_json
from vlserve.config import EngineConfig
from vlserve.engine.llm_engine import LLMEngine
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import ConfigError
from vlserve.media.item import MediaItem

Inputs = list[tuple[list[int], list[MediaItem]]]


def run_offline(config: EngineConfig, workload: Workload, json_path: str | None = None) -> BenchSummary:
    engine = LLMEngine(config)
    if workload.num_images and not engine.model_config.is_multimodal:
        raise ConfigError(f"--image-size: the model at {config.model} is text-only "
                          f"({engine.model_config.architecture}); drop the image flags or pass a Qwen2.5-VL model")
    prompts = make_prompts(workload, engine.tokenizer)
    inputs = [engine_inputs(p, engine.tokenizer, engine.model_config, config.media) for p in prompts]
    check_lengths(inputs, workload, engine.max_model_len)
    timings, elapsed = drive(engine, inputs, workload.sampling_params())
    bm = engine.block_manager
    summary = summarize(timings, elapsed, prefix_cache_hit_rate=bm.hits / bm.queries if bm.queries else 0.0,
                        preemptions=engine.scheduler.num_preemptions)
    dtype = str(engine.dtype).removeprefix("torch.")
    context = {"Model": config.model, "Device": str(engine.device), "Dtype": dtype,
               "KV cache": f"{bm.num_blocks} blocks of {bm.block_size} tokens, max model len {engine.max_model_len}"}
    print(report("vlserve bench offline", context, summary))
    if json_path:
        write_json(json_path, summary, {
            "model": config.model, "device": str(engine.device), "dtype": dtype, "num_kv_blocks": bm.num_blocks,
            "max_model_len": engine.max_model_len, "workload": asdict(workload), "engine": asdict(config)})
    return summary


def check_lengths(inputs: Inputs, workload: Workload, max_model_len: int) -> None:
    """The engine refuses these too, but its message names max_tokens, not this command's flags."""
    longest = max(len(ids) for ids, _ in inputs)
    if longest + workload.output_len > max_model_len:
        extra = f" plus the chat template and {workload.num_images} image(s)" if workload.num_images else ""
        raise ConfigError(f"the longest prompt has {longest} tokens (--input-len {workload.input_len}{extra}); "
                          f"with --output-len {workload.output_len} that is over --max-model-len {max_model_len}: "
                          "lower them or raise --max-model-len")


def drive(engine: LLMEngine, inputs: Inputs, params: SamplingParams) -> tuple[list[RequestTiming], float]:
    """Submits everything, steps until done; per-request timings and the elapsed seconds."""
    start = time.monotonic()
    counts = {engine.add_request(ids, params, media): 0 for ids, media in inputs}
    timings = []
    with tqdm(total=len(counts), desc="Requests", unit="req") as bar:
        while engine.has_unfinished():
            for out in engine.step():
                counts[out.request_id] += sum(len(o.token_ids) for o in out.outputs)
                if out.finished:
                    m = out.metrics
                    timings.append(RequestTiming(len(out.prompt_token_ids), counts[out.request_id],
                                                 m.time_to_first_token, m.e2e_latency))
                    bar.update()
    return timings, time.monotonic() - start

