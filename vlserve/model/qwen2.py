"""The Qwen2 language model (as inside Qwen2-VL and Qwen2.5-VL): GQA with qkv bias, M-RoPE, RMSNorm, SwiGLU; and
Qwen3's (inside Qwen3-VL), the same with RMSNorm over each q and k head instead of the bias, interleaved M-RoPE and
DeepStack (vision features added to the first layers' outputs at the media rows). Its linear layers dense or 4-bit
AWQ/GPTQ (the MLP then padded to whole quantization groups per rank, `mlp_width`).

Tokens of all sequences in a step are flattened into one (T, hidden) batch; `AttentionMetadata` says where each
sequence starts. Tensor parallel: one all-reduce after attention and one after the MLP.
"""

import torch
from torch import nn

from vlserve.config import ModelConfig
from vlserve.config import stage_layers
from vlserve.distributed.parallel_state import pipeline_stage, tp_size
from vlserve.model.layers.activation import SiluAndMul
from vlserve.model.layers.attention import Attention, AttentionMetadata
from vlserve.model.quantization import QuantConfig, mlp_width
from vlserve.model.layers.embedding import VocabParallelEmbedding
from vlserve.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vlserve.model.layers.norm import RMSNorm
from vlserve.model.layers.rotary import MRotaryEmbedding


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None = None):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          bias=cfg.attention_bias, quant=quant)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, quant=quant)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = MRotaryEmbedding(d, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        a = self.attn
        q, k, v = self.qkv_proj(x).split([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim,
                                          a.num_kv_heads * a.head_dim], dim=-1)
        q, k = q.view(-1, a.num_heads, a.head_dim), k.view(-1, a.num_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v.view(-1, a.num_kv_heads, a.head_dim), meta)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None = None):
        super().__init__()
        real, width = cfg.intermediate_size, mlp_width(cfg, tp_size())
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [width] * 2, quant=quant,
                                                       real_sizes=[real] * 2)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, quant=quant, real_in=real)
        self.act = SiluAndMul()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        quant = QuantConfig.of(cfg.quantization, cfg.path)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, quant)

    def forward(self, x, residual, positions, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen2Model(nn.Module):
    """This pipeline stage's part: the embedding on the first stage, its run of layers (keyed by their global
    index, so parameter names match the checkpoint), the final norm on the last stage."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        stage = pipeline_stage()
        self.layer_ids = stage_layers(cfg.num_hidden_layers, stage.num_stages, stage.stage, stage.layer_partition)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if stage.is_first else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in self.layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.is_last else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata, deepstack: torch.Tensor | None = None,
                media_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`deepstack`: (features, media rows, hidden), feature i added to layer i's output at `media_rows`."""
        for i, layer in zip(self.layer_ids, self.layers.values()):
            x, residual = layer(x, residual, positions, meta)
            if deepstack is not None and i < deepstack.shape[0]:
                x = x.index_add(0, media_rows, deepstack[i].to(x.dtype))  # the layer's output is x + residual
        return x, residual
