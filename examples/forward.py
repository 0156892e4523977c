"""One forward pass of Qwen2.5-VL over an image and a question; prints the most likely next tokens.

usage: python examples/forward.py MODEL_DIR [IMAGE_PATH]
(`vlserve make-tiny DIR` writes a random-weight checkpoint: its guesses are noise, but every stage runs.)
"""

import os
import sys

import torch
from PIL import Image

from vlserve.config import EngineConfig, ModelConfig, resolve_dtype
from vlserve.engine.sampling_params import SamplingParams
from vlserve.inputs import InputProcessor
from vlserve.media.fetch import MediaPolicy
from vlserve.model.layers.attention import AttentionMetadata
from vlserve.model.loader import load_model

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    sys.exit(f"usage: python {sys.argv[0]} MODEL_DIR [IMAGE_PATH]   (a checkpoint folder; `vlserve make-tiny DIR` makes one)")
model_dir = sys.argv[1]
image = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else Image.radial_gradient("L").convert("RGB")
device = "cuda" if torch.cuda.is_available() else "cpu"

cfg = ModelConfig.from_dir(model_dir)
model = load_model(cfg, resolve_dtype("auto", device), device)

messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in this picture?"}]}]
policy = MediaPolicy(allowed_local_media_path=os.path.dirname(image) if isinstance(image, str) else None)
inputs = InputProcessor.for_model(EngineConfig(model=model_dir, media_policy=policy))  # what every front door uses
request = inputs.chat("example", messages, SamplingParams(max_tokens=1))
media = [span.item for span in request.media]

with torch.no_grad():
    media_embeds = torch.cat(model.encode_media(media))
    ids = torch.tensor(request.prompt_token_ids, device=device)
    meta = AttentionMetadata.from_lengths([len(ids)])
    hidden = model(ids, request.mrope_positions.to(device), meta, media_embeds, model.media_rows(ids))
    probs = model.compute_logits(hidden[-1:])[0].softmax(-1)

tokenizer = inputs.tokenizer
print(f"{len(ids)} prompt tokens, {media[0].num_tokens} of them for the "
      f"{media[0].grid_thw} image grid; rope_delta {request.rope_delta}; device {device}")
for p, token in zip(*probs.topk(5)):
    print(f"  {tokenizer.decode([int(token)])!r:>16}  {p.item():.4f}")
