"""A plan as text for people, as JSON for programs, and as the `vlserve serve` command that runs it."""

import json
import shlex
from dataclasses import fields

from vlserve.config import EngineConfig
from vlserve.media.options import MediaOptions
from vlserve.plan.memory import GIB, image_tokens
from vlserve.plan.planner import Candidate, Plan

PASSED_ON = ("block_size", "vision_cache_mib", "max_num_encoder_tokens", "num_gpu_blocks_override",
             "enable_prefix_caching", "enable_chunked_prefill", "limit_mm_per_prompt", "distributed_executor_backend")


def serve_command(plan: Plan) -> str:
    c, e = plan.chosen, plan.engine
    s = c.settings
    args = ["vlserve", "serve", e.model, "--tensor-parallel-size", str(s.tensor_parallel_size),
            "--pipeline-parallel-size", str(s.pipeline_parallel_size), "--dtype", c.dtype,
            "--max-model-len", str(c.max_model_len)]
    partition = e.pp_layer_partition
    if partition and len(partition) == s.pipeline_parallel_size:
        args += ["--pp-layer-partition", ",".join(map(str, partition))]
    if plan.inventory.is_cpu:
        args += ["--device", "cpu"]  # without --kv-cache-memory-gib, serve sizes the KV cache as this plan did
        if e.kv_cache_memory_gib is not None:
            args += ["--kv-cache-memory-gib", f"{e.kv_cache_memory_gib:g}"]
    else:
        args += ["--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}"]
    if s.mm_encoder_tp_mode != "data":
        args += ["--mm-encoder-tp-mode", s.mm_encoder_tp_mode]
    defaults = EngineConfig(model=e.model)
    if s.max_num_batched_tokens != defaults.batched_tokens(c.max_model_len):
        args += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
    if s.max_num_seqs != defaults.max_num_seqs:
        args += ["--max-num-seqs", str(s.max_num_seqs)]
    for name in PASSED_ON:
        value = getattr(e, name)
        if value != getattr(defaults, name):
            args += flag(name, value)
    if c.machines > 1 and e.distributed_executor_backend is None:
        args += ["--distributed-executor-backend", "ray"]
    media = {f.name: getattr(e.media, f.name) for f in fields(MediaOptions)
             if getattr(e.media, f.name) != getattr(MediaOptions(), f.name)}
    if s.max_pixels != MediaOptions().max_pixels:
        media["max_pixels"] = s.max_pixels
    if media:
        args += ["--mm-processor-kwargs", json.dumps(media, separators=(",", ":"))]
    return shlex.join(args)


def flag_name(knob: str) -> str:
    """How a user sets a knob the plan changes."""
    return "max_pixels (--mm-processor-kwargs)" if knob == "max_pixels" else "--" + knob.replace("_", "-")


def changes_text(c: Candidate) -> str:
    return ", ".join(f"{flag_name(knob)} {new} (not {old})" for knob, old, new in c.changes)


def changes_json(c: Candidate) -> list[dict]:
    return [{"knob": knob, "flag": flag_name(knob), "configured": old, "planned": new} for knob, old, new in c.changes]


def flag(name: str, value) -> list[str]:
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [option if value else "--no-" + option[2:]]
    if name == "limit_mm_per_prompt":
        return [option, json.dumps(dict(value), separators=(",", ":"))]
    return [option, str(value)]


def to_json(plan: Plan) -> dict:
    c = plan.chosen
    s = c.settings
    return {
        "feasible": plan.feasible,
        "errors": [{"code": p.code, "message": p.message, "fix": p.fix} for p in c.errors],
        "notes": [{"code": p.code, "message": p.message, "fix": p.fix} for p in c.notes],
        "model": plan.cfg.path,
        "hardware": plan.inventory.describe(),
        "tensor_parallel_size": s.tensor_parallel_size,
        "pipeline_parallel_size": s.pipeline_parallel_size,
        "mm_encoder_tp_mode": s.mm_encoder_tp_mode,
        "max_num_batched_tokens": s.max_num_batched_tokens,
        "max_pixels": s.max_pixels,
        "gpu_memory_utilization": s.gpu_memory_utilization,
        "max_num_seqs": s.max_num_seqs,
        "changed": changes_json(c),
        "dtype": c.dtype or None,
        "dtype_reason": c.dtype_why or None,
        "max_model_len": c.max_model_len if c.feasible else None,
        "kv_cache_tokens": c.kv_tokens if c.memory else None,
        "max_concurrency": round(c.kv_tokens / c.max_model_len, 2) if c.feasible and c.max_model_len else None,
        "memory_per_gpu": [{"stage": r.stage, "device": r.device, "capacity_bytes": r.capacity,
                            "weights_bytes": r.weights, "activation_peak_bytes": r.activation,
                            "reserve_bytes": r.reserve, "kv_cache_bytes": r.kv_cache,
                            "kv_bytes_per_block": r.kv_per_block} for r in c.memory],
        "command": serve_command(plan) if plan.feasible else None,
        "layouts": [{"tensor_parallel_size": x.settings.tensor_parallel_size,
                     "pipeline_parallel_size": x.settings.pipeline_parallel_size, "feasible": x.feasible,
                     "kv_cache_tokens": x.kv_tokens if x.feasible else None, "changed": changes_json(x),
                     "errors": [{"code": p.code, "message": p.message} for p in x.errors]} for x in plan.layouts],
    }


def to_text(plan: Plan) -> str:
    c, cfg = plan.chosen, plan.cfg
    s = c.settings
    lines = [f"model: {cfg.path}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} attention heads / "
             f"{cfg.num_key_value_heads} KV heads, MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size}"
             + (f", AWQ {cfg.quantization.get('bits')}-bit" if cfg.quantization else ""),
             f"hardware: {plan.inventory.describe()}", ""]
    verdict = "FEASIBLE" if plan.feasible else "NOT FEASIBLE"
    lines.append(f"{verdict}: tensor parallel {s.tensor_parallel_size} x pipeline parallel "
                 f"{s.pipeline_parallel_size}" + (f" on {c.machines} machines" if c.machines > 1 else ""))
    if c.changes:
        label = "set by the plan" if c.feasible else "tried, and still not enough"
        lines.append(f"{label} (flags not given): {changes_text(c)}")
    for p in c.errors:
        lines += [f"  error [{p.code}]: {p.message}"] + ([f"    fix: {p.fix}"] if p.fix else [])
    if c.dtype:
        lines.append(f"dtype: {c.dtype} ({c.dtype_why})")
    if c.memory:
        lines += memory_table(plan, c)
    if plan.feasible:
        lines += [f"KV cache: {c.kv_tokens:,} tokens ({c.kv_blocks:,} blocks of {plan.engine.block_size})",
                  (f"max_model_len: {c.max_model_len:,} (the model's limit: {cfg.max_position_embeddings:,}); "
                  f"concurrency at that length: {c.kv_tokens / c.max_model_len:.2f}x; --max-num-batched-tokens "
                  f"{s.max_num_batched_tokens}")]
        if cfg.vision:
            lines.append(f"vision: --mm-encoder-tp-mode {s.mm_encoder_tp_mode}, largest image {s.max_pixels:,} pixels "
                         f"({image_tokens(s.max_pixels, cfg.vision):,} tokens)")
    for p in c.notes:
        if p.code != "bf16_unsupported":  # the dtype line says it
            lines.append(f"note [{p.code}]: {p.message}" + (f"; {p.fix}" if p.fix else ""))
    if plan.feasible:
        lines += ["", "command:", "  " + serve_command(plan)]
    return "\n".join(lines + ["", "layouts (TP x PP):"] + layout_lines(plan))


def memory_table(plan: Plan, c: Candidate) -> list[str]:
    """One column per group of alike stages (the middle stages of a deep pipeline are usually equal)."""
    unit = f"GPU at --gpu-memory-utilization {c.settings.gpu_memory_utilization:g}" if not plan.inventory.is_cpu \
        else "rank (CPU)"
    columns: list[list] = []
    for r in c.memory:
        same = columns and (columns[-1][-1].device, columns[-1][-1].weights, columns[-1][-1].activation) == \
            (r.device, r.weights, r.activation)
        if same:
            columns[-1].append(r)
        else:
            columns.append([r])
    names = [f"stage {g[0].stage}" + (f"-{g[-1].stage}" if len(g) > 1 else "") + f" {g[0].device}" for g in columns]
    out = [f"memory per {unit} (GiB)"]
    out.append(" " * 20 + "".join(name[:24].rjust(26) for name in names))
    for label, attr in (("weights", "weights"), ("activation peak", "activation"), ("reserved", "reserve"),
                        ("KV cache", "kv_cache"), ("total", "total"), ("device memory", "capacity")):
        out.append(f"  {label}".ljust(20) + "".join(f"{getattr(g[0], attr) / GIB:26.2f}" for g in columns))
    return out


def layout_lines(plan: Plan) -> list[str]:
    """Feasible layouts one per line; failing ones grouped by tensor-parallel size and reason, with the message
    of the one closest to fitting."""
    groups: list[list[Candidate]] = []
    for x in plan.layouts:
        key = (x.settings.tensor_parallel_size, x.errors[0].code if x.errors else None)
        if x.errors and groups and groups[-1][0].errors and \
                (groups[-1][0].settings.tensor_parallel_size, groups[-1][0].errors[0].code) == key:
            groups[-1].append(x)
        else:
            groups.append([x])
    out = []
    for group in groups:
        first, last = group[0].settings, group[-1].settings
        pp = f"{first.pipeline_parallel_size}" + (f"-{last.pipeline_parallel_size}" if len(group) > 1 else "")
        if not group[0].errors:
            chosen = "  <- chosen" if group[0] is plan.chosen else ""
            changed = f" with {changes_text(group[0])}" if group[0].changes else ""
            out.append(f"  {first.tensor_parallel_size} x {pp}: fits, KV cache {group[0].kv_tokens:,} tokens"
                       f"{changed}{chosen}")
        else:
            closest = min(group, key=lambda x: x.overshoot)
            tried = f" (even with {changes_text(closest)})" if closest.changes else ""
            out.append(f"  {first.tensor_parallel_size} x {pp}: {closest.errors[0].message}{tried}")
    return out
