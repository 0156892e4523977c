"""Names and shapes of the tensors in a Hugging Face Qwen2.5-VL, Qwen2-VL, Qwen3-VL (or Qwen2) checkpoint, from the
config alone, named as the model's parameters are (`hub_name` gives the checkpoint's own name).

make-tiny writes these, and the planner sizes weights from them without reading any file.
"""

from vlserve.config import QWEN3_VL, ModelConfig, VisionConfig

# Qwen3-VL's checkpoints nest the parts (the loader's PREFIX_ALIASES map them back)
NESTED_PREFIXES = (("model.", "model.language_model."), ("visual.", "model.visual."))


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        shapes.update(_decoder_layer(cfg, f"model.layers.{i}."))
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    if cfg.vision is not None:
        shapes.update(_vision(cfg.vision))
    return shapes


def hub_name(name: str, cfg: ModelConfig) -> str:
    """The name `name` (of checkpoint_shapes) has in the family's published checkpoints."""
    if cfg.architecture != QWEN3_VL:
        return name
    return next((new + name[len(old):] for old, new in NESTED_PREFIXES if name.startswith(old)), name)


def _decoder_layer(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {}
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes[f"{p}self_attn.{name}.weight"] = (rows, h)
        if cfg.attention_bias:
            shapes[f"{p}self_attn.{name}.bias"] = (rows,)
    shapes.update({
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    })
    if cfg.qk_norm:
        shapes.update({p + "self_attn.q_norm.weight": (cfg.head_dim,), p + "self_attn.k_norm.weight": (cfg.head_dim,)})
    return shapes


def _vision(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, m = v.hidden_size, v.intermediate_size
    shapes = {"visual.patch_embed.proj.weight": (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    if v.patch_bias:
        shapes["visual.patch_embed.proj.bias"] = (d,)
    if v.num_position_embeddings is not None:
        shapes["visual.pos_embed.weight"] = (v.num_position_embeddings, d)
    mlp = {"gated": {"gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m)},
           "fc": {"fc1": (m, d), "fc2": (d, m)},
           "linear_fc": {"linear_fc1": (m, d), "linear_fc2": (d, m)}}[v.mlp]
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes.update({**_norm(v, p + "norm1."), **_norm(v, p + "norm2."),
                       p + "attn.qkv.weight": (3 * d, d),
                       p + "attn.qkv.bias": (3 * d,),
                       p + "attn.proj.weight": (d, d),
                       p + "attn.proj.bias": (d,)})
        for name, shape in mlp.items():
            shapes.update({f"{p}mlp.{name}.weight": shape, f"{p}mlp.{name}.bias": shape[:1]})
    shapes.update(_merger(v, "visual.merger."))
    for i in range(len(v.deepstack_visual_indexes)):
        shapes.update(_merger(v, f"visual.deepstack_merger_list.{i}.", grouped=True))
    return shapes


def _merger(v: VisionConfig, p: str, grouped: bool = False) -> dict[str, tuple[int, ...]]:
    merged = v.hidden_size * v.spatial_merge_size**2
    fc1, fc2 = (p + "linear_fc1.", p + "linear_fc2.") if v.merger == "linear" else (p + "mlp.0.", p + "mlp.2.")
    norm = p + ("norm." if v.merger == "linear" else "ln_q.")
    norm_shapes = {norm + "weight": (merged,), norm + "bias": (merged,)} if grouped else _norm(v, norm)
    return {**norm_shapes, fc1 + "weight": (merged, merged), fc1 + "bias": (merged,),
            fc2 + "weight": (v.out_hidden_size, merged), fc2 + "bias": (v.out_hidden_size,)}


def _norm(v: VisionConfig, p: str) -> dict[str, tuple[int, ...]]:
    d = v.hidden_size
    return {p + "weight": (d,), p + "bias": (d,)} if v.norm == "layer" else {p + "weight": (d,)}
