"""`vlserve bench offline`: throughput and latency of the engine in-process (`LLM`), as vLLM's `bench throughput`.

All requests are submitted at once and the engine steps until every one is done, so the figures are the engine's
throughput with a full queue. TTFT counts from submission, so it includes waiting behind earlier requests.
Prompts go through the input processor (tokens, image preprocessing) before the clock starts; vision encoding
runs inside the steps.
"""

import time
from dataclasses import asdict

from tqdm import tqdm

from vlserve.bench.prompts import BenchPrompt, Workload, engine_request, make_prompts
from vlserve.bench.stats import BenchSummary, RequestTiming, report, summarize, write_json
from vlserve.config import EngineConfig
from vlserve.engine.request import EngineRequest
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import ConfigError, InvalidRequestError
from vlserve.llm import LLM


def run_offline(config: EngineConfig, workload: Workload, json_path: str | None = None) -> BenchSummary:
    llm = LLM.from_config(config)
    core = llm.core
    if workload.num_images and not core.model_config.is_multimodal:
        raise ConfigError(f"--image-size: the model at {config.model} is text-only "
                          f"({core.model_config.architecture}); drop the image flags or pass a Qwen2.5-VL model")
    params = workload.sampling_params()
    try:
        requests = engine_requests(llm, make_prompts(workload, llm.tokenizer), params)
    except InvalidRequestError as e:
        raise ConfigError(f"{e} (this benchmark's prompts: --input-len {workload.input_len} text tokens, "
                          f"{workload.num_images} image(s), --output-len {workload.output_len})") from e
    timings, elapsed = drive(llm, requests)
    bm = core.block_manager
    summary = summarize(timings, elapsed, prefix_cache_hit_rate=bm.hits / bm.queries if bm.queries else 0.0,
                        preemptions=core.scheduler.num_preemptions)
    dtype = str(core.dtype).removeprefix("torch.")
    context = {"Model": config.model, "Device": str(core.device), "Dtype": dtype,
               "KV cache": f"{bm.num_blocks} blocks of {bm.block_size} tokens, max model len {core.max_model_len}"}
    print(report("vlserve bench offline", context, summary))
    if json_path:
        write_json(json_path, summary, {
            "model": config.model, "device": str(core.device), "dtype": dtype, "num_kv_blocks": bm.num_blocks,
            "max_model_len": core.max_model_len, "workload": asdict(workload),
            "engine": {**asdict(core.config), "tunable": sorted(config.tunable)}})  # as run, and what it settled
    return summary


def engine_requests(llm: LLM, prompts: list[BenchPrompt], params: SamplingParams) -> list[EngineRequest]:
    """The prompts through `llm`'s input processor, ready for `drive` (which starts the clock after them)."""
    return [engine_request(llm.inputs, p, params, llm.new_id()) for p in prompts]


def drive(llm: LLM, requests: list[EngineRequest]) -> tuple[list[RequestTiming], float]:
    """Submits everything, steps until done; per-request timings and the elapsed seconds."""
    start = time.monotonic()
    counts = {}
    for req in requests:
        req.arrival_time = start
        llm.submit(req)
        counts[req.request_id] = 0
    timings = []
    with tqdm(total=len(counts), desc="Requests", unit="req") as bar:
        while llm.outputs.has_unfinished():
            for out in llm.step():
                counts[out.request_id] += sum(len(o.token_ids) for o in out.outputs)
                if out.finished:
                    m = out.metrics
                    timings.append(RequestTiming(len(out.prompt_token_ids), counts[out.request_id],
                                                 m.time_to_first_token, m.e2e_latency))
                    bar.update()
    return timings, time.monotonic() - start
