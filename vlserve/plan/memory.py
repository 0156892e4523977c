"""The memory model: what each rank holds, from config.json alone, as the engine allocates it.

Weights come from the checkpoint's tensor shapes (`checkpoint_shapes`) cut the way the parallel layers cut them:
vocabulary rows and attention/MLP output rows split over tensor-parallel ranks, KV heads replicated when there are
fewer than ranks, the vision tower whole on the first stage (data mode) or split (weights mode). The KV cache is
sized as `LLMEngine.num_kv_blocks` does. The activation peak follows the engine's profiling step
(`ModelRunner.profile_free_blocks`: a full token budget through the stage's layers, logits for every seat, the
largest allowed image through the vision tower, the costliest sampling of every seat on the first stage's first
rank), counting the tensors alive at the worst moment of each.
"""

import math
from dataclasses import dataclass

from vlserve.config import ModelConfig, VisionConfig, stage_layers
from vlserve.engine.sampling_params import sampler_chunk_rows
from vlserve.media.options import MediaOptions, grid_tokens
from vlserve.model.quantization import PACK, QuantConfig, is_quantized_weight, mlp_width, readable
from vlserve.model.layout import checkpoint_shapes

MIB, GIB = 2**20, 2**30
# Measured on an H100 (torch 2.11, CUDA 13.0; docs/benchmarks.md): memory outside PyTorch's allocator (the CUDA
# context, kernels, library handles; 687 MiB there, rounded up), the cuBLAS workspace the first matrix product
# allocates (33 MiB, part of the engine's profiled peak), and the allocator's rounding of the weights' blocks (0.40%
# of them for 7B).
CUDA_CONTEXT_BYTES = 704 * MIB
CUBLAS_WORKSPACE_BYTES = 33 * MIB
ALLOCATOR_ROUNDING = 0.005
# NCCL's buffers when ranks talk over NCCL, an estimate: 9.2 MiB per connection (4 MiB simple, 4.7 MiB LL128,
# 0.5 MiB LL protocol buffers), ring and tree connections over up to 8 channels, and the pipeline hand-offs' p2p.
NCCL_BYTES = 256 * MIB
CPU_PROCESS_BYTES = 1 * GIB  # Python, torch and the tokenizer, per process, on a CPU plan

# The sampler's worst case (`sampler.WORST_CASE`), in fp32 (seats, vocabulary) logits, measured on the CPU with
# torch.profiler's allocations: the logits, their penalised copy and its temporary (every seat at once), then the
# logits, the penalised copy and 5 copies of one chunk of rows (`sampler.row_chunks`: filters, sort, draw).
# On a GPU the chunk costs 16: CUDA's sort keeps keys, int64 indices and their double buffers (15.4 measured on an
# H100 at 27 and at 256 seats, benchmarks/memory_model.py).
SAMPLER_FULL_COPIES = 3
SAMPLER_CHUNK_COPIES = 5
SAMPLER_CHUNK_COPIES_GPU = 16


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as a rank of it sees it."""

    index: int
    num_stages: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def stages(cfg: ModelConfig, pp: int, partition: tuple[int, ...] | None = None) -> list[Stage]:
    return [Stage(s, pp, stage_layers(cfg.num_hidden_layers, pp, s, partition)) for s in range(pp)]


@dataclass(frozen=True)
class Step:
    """The engine's worst-case profiling step."""

    tokens: int  # --max-num-batched-tokens
    logits_rows: int  # min(--max-num-seqs, tokens)
    image_patches: int  # patches of the largest allowed image (max_pixels)


class Weights:
    """Bytes of parameters one rank of a stage holds, to the byte; cached per (tp, vision split, dtype)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.shapes = checkpoint_shapes(cfg)
        self.cache: dict[tuple, tuple[list[int], dict[str, int]]] = {}

    def rank_bytes(self, tp: int, stage: Stage, vision_split: bool, dtype_bytes: int) -> int:
        layers, parts = self.parts(tp, vision_split, dtype_bytes)
        total = sum(layers[i] for i in stage.layers)
        if stage.is_first:
            total += parts["model.embed_tokens."] + parts["visual."]
        if stage.is_last:
            total += parts["model.norm."] + parts["lm_head."]
            if self.cfg.tie_word_embeddings and not stage.is_first:
                total += parts["model.embed_tokens."]  # a last stage without the embedding keeps its own copy
        return total

    def parts(self, tp: int, vision_split: bool, dtype_bytes: int) -> tuple[list[int], dict[str, int]]:
        key = (tp, vision_split, dtype_bytes)
        if key not in self.cache:
            layers = [0] * self.cfg.num_hidden_layers
            parts = dict.fromkeys(("model.embed_tokens.", "visual.", "model.norm.", "lm_head."), 0)
            for name, shape in self.shapes.items():
                size = self.tensor_bytes(name, local_shape(self.cfg, name, shape, tp, vision_split), dtype_bytes)
                if name.startswith("model.layers."):
                    layers[int(name.split(".")[2])] += size
                else:
                    parts[next(p for p in parts if name.startswith(p))] += size
            self.cache[key] = layers, parts
        return self.cache[key]

    def tensor_bytes(self, name: str, shape: tuple[int, ...], dtype_bytes: int) -> int:
        quant = quantized(self.cfg, name)
        if quant is None:
            return prod(shape) * dtype_bytes
        # an (out, in) weight as AWQ or GPTQ store it: 4-bit weights, int32 zero points (in/group, out/8), 16-bit
        # scales (in/group, out); GPTQ also keeps each input's group index, int32 (in,)
        rows, cols = shape
        groups = cols // quant.group_size
        # (one g_idx for a merged q|k|v or gate|up layer: the shards' are the same)
        shared = name.endswith((".k_proj.weight", ".v_proj.weight", ".up_proj.weight"))
        g_idx = cols * 4 if quant.method == "gptq" and not shared else 0
        return cols * rows // 2 + groups * (rows // PACK) * 4 + groups * rows * 2 + g_idx


def prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# output rows split; columns split (linear_fc1/2: Qwen3-VL's blocks, merger and DeepStack mergers)
VISION_COLUMN = ("attn.qkv.", "mlp.gate_proj.", "mlp.up_proj.", "mlp.fc1.", "merger.mlp.0.", "linear_fc1.")
VISION_ROW = ("attn.proj.weight", "mlp.down_proj.weight", "mlp.fc2.weight", "merger.mlp.2.weight", "linear_fc2.weight")


def quantized(cfg: ModelConfig, name: str) -> QuantConfig | None:
    """The checkpoint's quantization if this tensor is one of the language model's 4-bit weights, else None."""
    if not is_quantized_weight(name):
        return None
    return readable(cfg.quantization)


def local_shape(cfg: ModelConfig, name: str, shape: tuple[int, ...], tp: int, vision_split: bool) -> tuple[int, ...]:
    """The shape of this rank's slice, as linear.py / embedding.py / vision.py cut it."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (-(-shape[0] // tp), shape[1])  # vocabulary rows, the last rank zero-padded
    if name.startswith("visual."):
        if not vision_split:
            return shape
        if any(part in name for part in VISION_COLUMN):
            return (shape[0] // tp, *shape[1:])
        return (shape[0], shape[1] // tp) if name.endswith(VISION_ROW) else shape
    if ".k_proj." in name or ".v_proj." in name:  # fewer KV heads than ranks: each rank keeps one
        return (max(1, cfg.num_key_value_heads // tp) * cfg.head_dim, *shape[1:])
    if ".gate_proj." in name or ".up_proj." in name:  # an AWQ MLP padded to whole groups per rank
        return (mlp_width(cfg, tp) // tp, *shape[1:])
    if name.endswith(".down_proj.weight"):
        return (shape[0], mlp_width(cfg, tp) // tp)
    if ".q_proj." in name:
        return (shape[0] // tp, *shape[1:])
    if name.endswith(".o_proj.weight"):
        return (shape[0], shape[1] // tp)
    return shape


def kv_bytes_per_block(cfg: ModelConfig, tp: int, num_layers: int, block_size: int, dtype_bytes: int) -> int:
    """As ModelRunner.kv_bytes_per_block: K and V of `block_size` tokens in each of the rank's layers."""
    return 2 * block_size * max(1, cfg.num_key_value_heads // tp) * cfg.head_dim * dtype_bytes * num_layers


def largest_image(max_pixels: int, vision: VisionConfig) -> tuple[int, int, int]:
    """Grid of the largest image the profiling step encodes (MediaOptions.largest_image_grid)."""
    return MediaOptions(max_pixels=max_pixels).for_vision(vision).largest_image_grid()


def image_patches(max_pixels: int, vision: VisionConfig) -> int:
    return math.prod(largest_image(max_pixels, vision))


def image_tokens(max_pixels: int, vision: VisionConfig) -> int:
    return grid_tokens(largest_image(max_pixels, vision), vision.spatial_merge_size)


def activation_bytes(cfg: ModelConfig, tp: int, stage: Stage, step: Step, vision_split: bool, dtype_bytes: int,
                     on_gpu: bool = False) -> int:
    """Peak bytes above the weights during the engine's profiling step on one rank of `stage`. `on_gpu`: RMSNorm and
    SiLU-and-mul are single Triton kernels (no fp32 copies, no SiLU(gate) temporary), and the sampler sorts with
    CUDA's larger workspace."""
    t, h, b = step.tokens, cfg.hidden_size, dtype_bytes
    hidden = t * h * b
    base = 2 * t * 8  # token ids and positions (int64)
    if not stage.is_first:
        base += 2 * hidden  # hidden states and residual received from the previous stage
    peaks = [language_peak(cfg, tp, stage, t, b, on_gpu)]
    final = hidden if stage.is_last else 2 * hidden  # the stage's output, alive until the profile ends
    if stage.is_last:
        peaks.append(final + logits_peak(cfg, tp, min(step.logits_rows, t), b))
    if stage.is_first and cfg.vision is not None and step.image_patches:
        peaks.append(final + vision_peak(cfg, tp, step.image_patches, vision_split, b, on_gpu))
    if stage.is_first:  # global rank 0 samples (the first stage's other ranks are sized as it is)
        peaks.append(final + sampler_peak(cfg.vocab_size, min(step.logits_rows, t), on_gpu))
    return base + max(peaks)


def language_peak(cfg: ModelConfig, tp: int, stage: Stage, t: int, b: int, fused: bool = False) -> int:
    """A decoder layer in the middle of the stage. Alive: the stage's input (the embedding, or the received pair),
    the previous layer's output and residual (held by the layer loop), this layer's residual and normed input; then
    the largest of the MLP, attention and RMSNorm temporaries."""
    d, h = cfg.head_dim, cfg.hidden_size
    hidden = t * h * b
    resident = (5 if stage.is_first else 4) * hidden
    heads, kv_heads = cfg.num_attention_heads // tp, max(1, cfg.num_key_value_heads // tp)
    q, k = t * heads * d * b, t * kv_heads * d * b
    qkv, rotary = q + 2 * k, 2 * t * d * b
    # qkv output, then: q rotated (q*cos, rotate_half, *sin: three q-sized temporaries) or, in the varlen kernel
    # (flash, or Triton before sm_80; memory linear in T), the rotated q and k and the output
    attention = qkv + rotary + 3 * q + k
    mlp = (3 if fused else 4) * t * (cfg.intermediate_size // tp) * b  # gate|up, [SiLU(gate),] SiLU(gate) * up
    # RMSNorm's output (the fused kernel adds into the residual in place), or its fp32 copies and the residual sum
    norm = hidden if fused else (2 if b < 4 else 1) * t * h * 4 + hidden
    # a 4-bit layer: the GPU's kernels read it packed; the CPU dequantizes it for its matmul
    dequantize = 0 if fused else dequantize_peak(cfg, tp, b)
    return resident + max(attention, mlp, norm, dequantize)


def dequantize_peak(cfg: ModelConfig, tp: int, b: int) -> int:
    """The plain-torch path's transient bytes for a rank's largest 4-bit layer (gate|up: hidden x 2 MLP widths):
    two int32 copies of the weight (unpacked weights and zero points), or one and two in the model's dtype (the
    converted weight and the scales spread over it), whichever is more (layers/awq.py, layers/gptq.py); plus the
    zero points of each group unpacked. 0 for a dense model."""
    quant = readable(cfg.quantization)
    if quant is None:
        return 0
    weights = cfg.hidden_size * 2 * (mlp_width(cfg, tp) // tp)
    return max(8 * weights + 4 * weights // quant.group_size, (4 + 2 * b) * weights)


def logits_peak(cfg: ModelConfig, tp: int, rows: int, b: int) -> int:
    """compute_logits on the last `rows` positions: this rank's vocabulary slice, gathered, then cast to fp32."""
    local = rows * -(-cfg.vocab_size // tp) * b
    gathered = local * tp if tp > 1 else 0
    during_gather = local + 2 * gathered  # the slice, every rank's slice, their concatenation
    return max(during_gather, (gathered or local) + rows * cfg.vocab_size * 4)


def sampler_peak(vocab: int, rows: int, on_gpu: bool = False) -> int:
    """The logits of every seat (fp32) and the sampler's temporaries at its worst."""
    chunk = min(rows, sampler_chunk_rows(vocab))
    per_chunk = SAMPLER_CHUNK_COPIES_GPU if on_gpu else SAMPLER_CHUNK_COPIES
    copies = max(SAMPLER_FULL_COPIES * rows, (SAMPLER_FULL_COPIES - 1) * rows + per_chunk * chunk)
    return copies * vocab * 4


def vision_peak(cfg: ModelConfig, tp: int, patches: int, split: bool, b: int, fused: bool = False) -> int:
    """The tower on the largest image: pixels (fp32, as the preprocessor made them) and the rotary tables stay
    alive; in a block, its input and normed input plus the worst of: the 2-D rotary (computed in fp32), attention,
    the MLP."""
    v = cfg.vision
    n, heads = patches, v.num_heads // tp if split else v.num_heads
    mlp_width = v.intermediate_size // tp if split else v.intermediate_size
    x = n * v.hidden_size * b
    q = n * heads * v.head_dim * b
    q32 = n * heads * v.head_dim * 4
    resident = n * v.patch_dim * 4 + 2 * n * v.head_dim * 4
    rotary = 2 * x + 3 * q + q + 4 * q32  # input, normed, qkv, rotated q; then k's fp32 temporaries
    attention = 2 * x + 3 * q + 4 * q  # input, normed, qkv, rotated q and k, output buffer, SDPA output
    mlp = 3 * x + (3 if fused else 4) * n * mlp_width * b  # input, after attention, normed; gate|up, [SiLU,] product
    embed = n * v.patch_dim * b + 2 * x  # pixels cast to the model dtype; patch embedding and its reordering
    # Qwen3-VL: each DeepStack merger's output stays alive from its block on; at the end the merger's output and
    # all of them are concatenated into each token's embedding row
    merged = n // v.spatial_merge_size**2 * v.out_hidden_size * b
    features = len(v.deepstack_visual_indexes) * merged
    output = x + 2 * (features + merged)
    return resident + features + max(rotary, attention, mlp, embed, output)


def reserve_bytes(on_gpu: bool, world: int, weights: int) -> int:
    """What a rank holds besides weights, activations and KV: the CUDA context, cuBLAS's workspace, the allocator's
    rounding, and NCCL's buffers when ranks communicate; on a CPU, the process itself."""
    if not on_gpu:
        return CPU_PROCESS_BYTES
    nccl = NCCL_BYTES if world > 1 else 0
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + math.ceil(weights * ALLOCATOR_ROUNDING) + nccl
