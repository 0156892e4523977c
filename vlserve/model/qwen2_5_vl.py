"""Qwen2.5-VL, Qwen2-VL and Qwen3-VL for generation: the vision tower feeds embeddings into the language model's
token stream (the config's flags pick each family's parts: config.py).

Also serves plain Qwen2 text checkpoints (no vision tower). The forward pass takes flattened tokens plus, for
the media pad tokens among them, the vision embeddings in order, so a prompt can be split across steps. A media
token's embedding row is `VisionConfig.embed_width` wide: the token's input embedding, then (Qwen3-VL) one
DeepStack feature per early layer, which every pipeline stage holding such a layer adds at the media rows.
"""

import re

import torch
from torch import nn

from vlserve.config import ModelConfig
from vlserve.distributed.parallel_state import pipeline_stage
from vlserve.errors import InvalidRequestError
from vlserve.media.item import MediaItem
from vlserve.model.layers.attention import AttentionMetadata
from vlserve.model.layers.embedding import ParallelLMHead
from vlserve.model.qwen2 import Qwen2Model
from vlserve.model.vision import VisionTransformer
from vlserve.transfer import to_device


class Qwen2_5_VLForCausalLM(nn.Module):
    # checkpoint tensor name part -> (our parameter name part, shard of a merged parameter)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, vision_tp_mode: str = "data"):
        super().__init__()
        self.cfg = cfg
        self.stage = pipeline_stage()
        first, last = self.stage.is_first, self.stage.is_last
        self.visual = VisionTransformer(cfg.vision, vision_tp_mode) if cfg.vision is not None and first else None
        self.model = Qwen2Model(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size) if last else None
        if cfg.tie_word_embeddings and first and last:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.media_token_ids = (cfg.image_token_id, cfg.video_token_id)

    def on_other_stage(self, name: str) -> bool:
        """Whether a checkpoint tensor (by our parameter name) belongs to another pipeline stage."""
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:  # a layer past the model's last is not elsewhere: the loader reports it as unexpected
            return int(layer[1]) < self.cfg.num_hidden_layers and int(layer[1]) not in self.model.layer_ids
        if name.startswith(("model.embed_tokens.", "visual.")):
            return not self.stage.is_first
        if name.startswith(("model.norm.", "lm_head.")):
            return not self.stage.is_last
        return False

    def encode_media(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision embeddings, one (num_tokens, hidden) tensor per item."""
        if not items:
            return []
        if self.visual is None:
            raise InvalidRequestError(f"{self.cfg.path} is a text-only model; send text without images or videos")
        device = self.visual.patch_embed.proj.weight.device
        pixels = to_device(torch.cat([item.pixel_values for item in items]), device)  # no wait on the step in flight
        embeds = self.visual(pixels, [item.grid_thw for item in items])
        return list(embeds.split([item.num_tokens for item in items]))

    def media_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where a prompt's image/video pad tokens are (generated tokens never carry media: the runner finds them
        by span, on the host)."""
        return ((input_ids == self.media_token_ids[0]) | (input_ids == self.media_token_ids[1])).nonzero()[:, 0]

    def embed(self, input_ids: torch.Tensor, media_embeds: torch.Tensor | None,
              media_rows: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the rows `media_rows` (indices, in order) replaced by the rows of `media_embeds`.
        Indices, not a mask: a mask would make the host wait for the device to count it."""
        x = self.model.embed_tokens(input_ids)
        if media_embeds is None:
            return x
        if media_rows.numel() != media_embeds.shape[0]:
            raise InvalidRequestError(f"the batch holds {media_rows.numel()} image/video pad tokens but "
                                      f"{media_embeds.shape[0]} media embeddings were given; each pad token needs "
                                      "one embedding row")
        x[media_rows] = media_embeds[:, :self.cfg.hidden_size].to(x.dtype)
        return x

    def deepstack(self, media_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """(features, media rows, hidden): the DeepStack part of the media embeddings, None without it."""
        h = self.cfg.hidden_size
        if media_embeds is None or media_embeds.shape[1] == h:
            return None
        return media_embeds[:, h:].view(media_embeds.shape[0], -1, h).transpose(0, 1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                media_embeds: torch.Tensor | None = None, media_rows: torch.Tensor | None = None,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The last stage returns final hidden states (T, hidden), which `compute_logits` turns into logits; an
        earlier stage returns (hidden, residual) for the next one, which passes them back in `intermediate`."""
        if self.stage.is_first:
            x, residual = self.embed(input_ids, media_embeds, media_rows), None
        else:
            x, residual = intermediate
        x, residual = self.model(x, residual, positions, meta, self.deepstack(media_embeds), media_rows)
        if not self.stage.is_last:
            return x, residual
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
