"""`vlserve` command line. Each subcommand parses its flags and hands a config to the part that does the work."""

import argparse
import sys

from vlserve.errors import VLServeError


def add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a small random-weight Qwen2.5-VL checkpoint (Hugging Face format)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="language model layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA ratio = heads / kv-heads)")
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-hidden-size", type=int, default=64)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--vision-intermediate-size", type=int, default=96)
    p.add_argument("--fullatt-blocks", default="1,3", help="comma-separated indexes of full-attention vision blocks")
    p.add_argument("--text-only", action="store_true", help="a plain Qwen2ForCausalLM checkpoint")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors files (with an index when > 1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny)


def run_make_tiny(args) -> None:
    from vlserve.errors import ConfigError
    from vlserve.model.tiny import TinySpec, make_tiny

    try:
        blocks = tuple(int(i) for i in args.fullatt_blocks.split(",") if i.strip())
    except ValueError:
        raise ConfigError(f"--fullatt-blocks {args.fullatt_blocks!r} must be comma-separated integers") from None
    spec = TinySpec(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tie_word_embeddings, vision_depth=args.vision_depth,
        vision_hidden_size=args.vision_hidden_size, vision_heads=args.vision_heads,
        vision_intermediate_size=args.vision_intermediate_size, fullatt_block_indexes=blocks,
        text_only=args.text_only, shards=args.shards, seed=args.seed, dtype=args.dtype,
    )
    out = make_tiny(args.dir, spec)
    print(f"wrote a random-weight tiny checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve", description="Serve Qwen2.5-VL")
    sub = parser.add_subparsers(dest="command", required=True)
    add_make_tiny(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VLServeError as e:
        print(f"vlserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
