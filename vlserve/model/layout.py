"""Names and shapes of the tensors in a Hugging Face Qwen2.5-VL, Qwen2-VL (or Qwen2) checkpoint, from the config
alone.

make-tiny writes these, and the planner sizes weights from them without reading any file.
"""

from vlserve.config import ModelConfig, VisionConfig


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


def _decoder_layer(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    return {
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.q_proj.bias": (h,),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
        p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }


def _vision(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, m = v.hidden_size, v.intermediate_size
    merged = d * v.spatial_merge_size**2
    shapes = {"visual.patch_embed.proj.weight": (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    mlp = {"fc1": (m, d), "fc2": (d, m)} if v.mlp == "fc" else {"gate_proj": (m, d), "up_proj": (m, d),
                                                                 "down_proj": (d, m)}
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes.update({**_norm(v, p + "norm1."), **_norm(v, p + "norm2."),
                       p + "attn.qkv.weight": (3 * d, d),
                       p + "attn.qkv.bias": (3 * d,),
                       p + "attn.proj.weight": (d, d),
                       p + "attn.proj.bias": (d,)})
        for name, shape in mlp.items():
            shapes.update({f"{p}mlp.{name}.weight": shape, f"{p}mlp.{name}.bias": shape[:1]})
    shapes.update({
        **_norm(v, "visual.merger.ln_q."),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (v.out_hidden_size, merged),
        "visual.merger.mlp.2.bias": (v.out_hidden_size,),
    })
    return shapes


def _norm(v: VisionConfig, p: str) -> dict[str, tuple[int, ...]]:
    d = v.hidden_size
    return {p + "weight": (d,), p + "bias": (d,)} if v.norm == "layer" else {p + "weight": (d,)}
