"""`vlserve` command line. Each subcommand parses its flags and hands a config to the part that does the work."""

import argparse
import sys
from pathlib import Path

from vlserve.errors import ConfigError, VLServeError


def add_make_tiny(sub) -> None:
    from vlserve.config import FAMILIES

    p = sub.add_parser("make-tiny", help="write a small random-weight Qwen2.5-VL (or Qwen2-VL, Qwen3-VL) checkpoint "
                       "(Hugging Face format)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--hidden-size", type=int, default=64, help="language model width")
    p.add_argument("--intermediate-size", type=int, default=128, help="language model MLP width")
    p.add_argument("--layers", type=int, default=2, help="language model layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA ratio = heads / kv-heads)")
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--vision-depth", type=int, default=4, help="vision blocks")
    p.add_argument("--vision-hidden-size", type=int, default=64, help="vision tower width")
    p.add_argument("--vision-heads", type=int, default=4, help="vision attention heads")
    p.add_argument("--vision-intermediate-size", type=int, default=96, help="vision MLP width")
    p.add_argument("--fullatt-blocks", default="1,3", help="comma-separated indexes of full-attention vision blocks")
    p.add_argument("--text-only", action="store_true", help="a plain Qwen2ForCausalLM checkpoint")
    p.add_argument("--family", choices=tuple(FAMILIES), default="qwen2.5-vl",
                   help="the model family whose layout the checkpoint has")
    p.add_argument("--head-dim", type=int, default=0,
                   help="qwen3-vl: attention head width apart from hidden-size / heads (0: that quotient)")
    p.add_argument("--deepstack-blocks", default="1,2",
                   help="qwen3-vl: comma-separated vision blocks whose features feed the first language-model layers")
    p.add_argument("--awq", type=int, default=0, metavar="GROUP",
                   help="quantize the language model's linear layers to AWQ 4-bit (AutoAWQ's GEMM format) with groups "
                   "of GROUP inputs, by round to nearest")
    p.add_argument("--gptq", type=int, default=0, metavar="GROUP",
                   help="quantize them to GPTQ 4-bit instead (no act-order), groups of GROUP inputs")
    p.add_argument("--gptq-sym", action="store_true", help="with --gptq: symmetric (every zero point 8)")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors files (with an index when > 1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the weights written")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny)


def run_make_tiny(args) -> None:
    from vlserve.errors import ConfigError
    from vlserve.model.tiny import TinySpec, make_tiny

    def indexes(flag: str, value: str) -> tuple[int, ...]:
        try:
            return tuple(int(i) for i in value.split(",") if i.strip())
        except ValueError:
            raise ConfigError(f"{flag} {value!r} must be comma-separated integers") from None

    blocks = indexes("--fullatt-blocks", args.fullatt_blocks)
    spec = TinySpec(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tie_word_embeddings, vision_depth=args.vision_depth,
        vision_hidden_size=args.vision_hidden_size, vision_heads=args.vision_heads,
        vision_intermediate_size=args.vision_intermediate_size, fullatt_block_indexes=blocks,
        text_only=args.text_only, shards=args.shards, seed=args.seed, dtype=args.dtype, family=args.family,
        awq_group=args.awq, gptq_group=args.gptq, gptq_sym=args.gptq_sym, head_dim=args.head_dim,
        deepstack_visual_indexes=indexes("--deepstack-blocks", args.deepstack_blocks),
    )
    out = make_tiny(args.dir, spec)
    print(f"wrote a random-weight tiny checkpoint to {out}")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput and latency")
    bench = p.add_subparsers(dest="bench_command", required=True)
    add_bench_offline(bench)
    add_bench_serve(bench)


def add_workload_args(p) -> None:
    """What each benchmark request asks for; shared by the bench subcommands."""
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    g.add_argument("--input-len", type=int, default=512,
                   help="text tokens per prompt (with images, the chat template and image tokens come on top)")
    g.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    g.add_argument("--dataset", default="random", help="random: random words, different per prompt | fixed: one "
                   "text in every prompt (exercises the prefix cache)")
    g.add_argument("--image-size", metavar="WxH", help="add generated images of this size to each prompt")
    g.add_argument("--images-per-prompt", type=int, help="with --image-size (default 1)")
    g.add_argument("--same-image", action="store_true",
                   help="the same images in every prompt (default: distinct pixels, so no cache hits)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="1.0 as vLLM's benchmarks; 0 = greedy")


def workload_from_args(args):
    """The Workload the flags of add_workload_args (and --seed) describe."""
    from vlserve.bench.prompts import Workload, parse_image_size

    return Workload(
        num_prompts=args.num_prompts, input_len=args.input_len, dataset=args.dataset,
        image_size=parse_image_size(args.image_size), images_per_prompt=args.images_per_prompt,
        same_image=args.same_image, output_len=args.output_len, ignore_eos=args.ignore_eos,
        temperature=args.temperature, seed=args.seed,
    )


def check_json_path(path: str | None) -> None:
    """Before the benchmark runs, not after: a typo must not cost the run."""
    from vlserve.errors import ConfigError

    if path and not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"--json {path}: its folder does not exist; create it or pick another path")


def add_bench_offline(sub) -> None:
    from vlserve.args import add_engine_args

    p = sub.add_parser("offline", help="throughput of the engine in-process, all requests submitted at once")
    p.add_argument("model", nargs="?", help="checkpoint folder (default: a tiny random-weight demo checkpoint)")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    add_workload_args(p)
    add_engine_args(p)
    p.set_defaults(func=run_bench_offline)


def run_bench_offline(args) -> None:
    from vlserve.args import engine_config
    from vlserve.bench.offline import run_offline
    from vlserve.model.tiny import demo_checkpoint

    workload = workload_from_args(args)
    check_json_path(args.json)
    model = args.model
    if model is None:
        model = str(demo_checkpoint())
        print(f"no MODEL given: using the demo checkpoint at {model}; its weights are random, so only the speed "
              "means anything")
    run_offline(engine_config(args, model), workload, args.json)


def add_bench_serve(sub) -> None:
    p = sub.add_parser("serve", help="throughput and latency of a running OpenAI-compatible server, streaming")
    p.add_argument("--base-url", required=True, help="the server's root, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="bearer key for the server (default: $VLSERVE_API_KEY, else $VLLM_API_KEY)")
    p.add_argument("--model", help="model name to ask for (default: the first one the server lists)")
    p.add_argument("--tokenizer", help="folder holding the model's tokenizer, to build prompts of exact lengths "
                   "(default: the model folder the server names, which must then be on this machine)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions or /v1/completions (text only)")
    p.add_argument("--concurrency", type=int, help="requests in flight at most (default: no cap)")
    p.add_argument("--request-rate", type=float, help="requests per second, Poisson arrivals seeded by --seed "
                   "(default: all at once); combines with --concurrency")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request may take before it counts as failed")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    p.add_argument("--background-streams", type=int, metavar="N",
                   help="mixed load: N text streams decode alone, then while the workload arrives; their "
                   "inter-token latency is reported both ways")
    p.add_argument("--background-output-len", type=int, default=512,
                   help="with --background-streams: tokens each stream generates (long enough to outlast the "
                   "workload)")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    add_workload_args(p)
    p.set_defaults(func=run_bench_serve)


def run_bench_serve(args) -> None:
    from vlserve.args import api_key_from_env
    from vlserve.bench.serve import ServeBench, run_serve_bench

    cfg = ServeBench(
        base_url=args.base_url, api_key=args.api_key or api_key_from_env(), model=args.model,
        tokenizer=args.tokenizer, endpoint=args.endpoint, concurrency=args.concurrency,
        request_rate=args.request_rate, request_timeout_s=args.request_timeout,
        background_streams=args.background_streams, background_output_len=args.background_output_len,
    )
    workload = workload_from_args(args)
    check_json_path(args.json)
    run_serve_bench(cfg, workload, args.json)


def add_ui(sub) -> None:
    p = sub.add_parser("ui", help="a browser chat page (images, video, streaming) for an OpenAI-compatible server")
    p.add_argument("--api-base", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="bearer key for the server (default: $VLSERVE_API_KEY, else $VLLM_API_KEY)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on")
    p.add_argument("--port", type=int, default=7860, help="port of the chat page")
    p.add_argument("--model", help="model name to ask for (default: the first one the server lists)")
    p.set_defaults(func=run_ui)


def run_ui(args) -> None:
    from vlserve.args import api_key_from_env
    from vlserve.ui import run_ui as serve_page

    api_key = args.api_key or api_key_from_env()
    serve_page(check_api_base(args.api_base), api_key, host=args.host, port=args.port, model=args.model)


def check_api_base(url: str) -> str:
    """The OpenAI API lives under /v1: a server's root (the usual slip) is refused with the URL to use."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"--api-base {url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
    if not parsed.path.rstrip("/").endswith("/v1"):
        raise ConfigError(f"--api-base {url} does not end in /v1, where OpenAI-compatible servers (vlserve, vLLM) "
                          f"serve the API: try --api-base {url.rstrip('/')}/v1")
    return url


def add_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="start, join, inspect or stop a Ray cluster of machines that serve together")
    cluster = p.add_subparsers(dest="cluster_command", required=True)
    head = cluster.add_parser("head", help="start the head node on this machine")
    head.add_argument("--port", type=int, default=6379, help="port the other machines join")
    head.add_argument("--node-ip-address", help="this machine's address for the cluster (default: that of "
                      "--interface, else of the default route)")
    join = cluster.add_parser("join", help="join this machine to a head; the interface that routes to it is found "
                              "here and used for Ray, Gloo and NCCL")
    join.add_argument("head", metavar="HEAD:PORT", help="the address `vlserve cluster head` printed")
    for q in (head, join):
        q.add_argument("--gpus", help="cards this machine offers, e.g. 0,3,4 (default: all)")
        q.add_argument("--num-cpus", type=int, help="CPUs this machine offers (on a CPU-only cluster, one rank each)")
        q.add_argument("--interface", metavar="NAME", help="network interface to use instead of the detected one")
        q.add_argument("--temp-dir", help="Ray's folder for this node (default /tmp/ray)")
        q.add_argument("--block", action="store_true", help="stay in the foreground (containers, supervisors)")
    cluster.add_parser("status", help="the cluster's nodes, their cards and versions; differences flagged")
    cluster.add_parser("stop", help="stop the Ray processes vlserve started on this machine (no other Ray)")
    p.set_defaults(func=run_cluster)


def run_cluster(args) -> None:
    from vlserve.distributed import cluster

    if args.cluster_command in ("head", "join"):
        options = cluster.StartOptions(gpus=args.gpus, num_cpus=args.num_cpus, interface=args.interface,
                                       temp_dir=args.temp_dir, block=args.block)
        if args.cluster_command == "head":
            cluster.start_head(args.port, args.node_ip_address, options)
        else:
            cluster.join(args.head, options)
    elif args.cluster_command == "status":
        print(cluster.format_status(cluster.status()))
    else:
        count = cluster.stop()
        print(f"stopped {count} Ray process{'es' if count != 1 else ''} vlserve started on this machine" if count
              else "no Ray process that vlserve started runs on this machine")


def add_plan(sub) -> None:
    from vlserve.args import add_engine_args

    p = sub.add_parser("plan", help="before loading anything: the layouts that work, dtype, memory per GPU, KV cache, "
                       "the largest --max-model-len, and the serve command (reads only config.json)")
    p.add_argument("model", help="checkpoint folder, or a public checkpoint's name (e.g. Qwen2.5-VL-72B-Instruct-AWQ)")
    p.add_argument("--cluster", metavar="SPEC", help="plan for other hardware: [NODESx]GPUSxCARD[,...], e.g. "
                   "2x8xRTX2080Ti or 1x4xA100-80GB,1x4xA100-40GB; or 'ray': every node of the running Ray cluster "
                   "(default: this machine)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_engine_args(p)
    # Unset, the layout is the plan's to choose too (serve's is TP 1 x PP 1); what the user sets, it only checks.
    p.set_defaults(func=run_plan, tensor_parallel_size=None, pipeline_parallel_size=None)


def run_plan(args) -> int:
    import json

    from vlserve.args import engine_config
    from vlserve.plan.inventory import inventory
    from vlserve.plan.layouts import load_model_config
    from vlserve.plan.planner import make_plan
    from vlserve.plan.report import to_json, to_text

    cfg = load_model_config(args.model)
    hardware = inventory(args.cluster, cpu=args.device == "cpu")
    plan = make_plan(cfg, hardware, engine_config(args, args.model))
    print(json.dumps(to_json(plan), indent=2) if args.json else to_text(plan))
    return 0 if plan.feasible else 2


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine (or every node of the Ray cluster) for what would make "
                       "serving fail: kernels for each card, Triton, driver, dtypes, /dev/shm, network, model files")
    p.add_argument("model", nargs="?", help="checkpoint folder that must be present (and identical on every node)")
    p.add_argument("--head", metavar="HOST:PORT", help="the head node's address: checks this node's route to it and "
                   "the Gloo/NCCL interface variables")
    p.add_argument("--cluster", choices=["ray"], help="run the checks on every node of the running Ray cluster")
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> int:
    from vlserve.config import resolve_model_path
    from vlserve.plan import doctor

    model = None if args.model is None else resolve_model_path(args.model)
    reports, across = doctor.run(args.head, model, on_cluster=args.cluster == "ray")
    print(doctor.format_report(reports, across))
    return 2 if doctor.any_fatal(reports, across) else 0


class DefaultsShown(argparse.HelpFormatter):
    """--help names each option's default, unless its help already says it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """Every vlserve command's parser (subcommands' parsers are of their parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag is answered with the command's closest one ("did you mean")."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unknown_flags(self.command_parser(parsed), extras))
        return parsed

    def command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub)command's own parser: the deepest one the arguments chose."""
        parser = self
        while True:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            chosen = getattr(parsed, subs[0].dest, None) if subs else None
            if chosen not in (subs[0].choices if subs else {}):
                return parser
            parser = subs[0].choices[chosen]


def unknown_flags(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    import difflib

    known = [flag for action in parser._actions for flag in action.option_strings]
    notes = []
    for arg in extras:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-"):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        notes.append(f"{flag}: did you mean {close[0]}?" if close else
                     f"{flag} is not a vlserve flag (docs/serving.md lists vLLM's flags and what vlserve does with "
                     "each)")
    return f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(notes)})" if notes else "")


def build_parser() -> argparse.ArgumentParser:
    from vlserve.serve.server import add_serve_args  # the server and torch: `vlserve plan` does without (plan_parser)

    parser = Parser(prog="vlserve", description="Serve Qwen2.5-VL")
    sub = parser.add_subparsers(dest="command", required=True)
    add_make_tiny(sub)
    add_serve_args(sub)
    add_bench(sub)
    add_ui(sub)
    add_cluster(sub)
    add_plan(sub)
    add_doctor(sub)
    return parser


def plan_parser() -> argparse.ArgumentParser:
    """`vlserve plan` answers in under a second: its parser alone, without the server's (which imports torch)."""
    parser = Parser(prog="vlserve", description="Serve Qwen2.5-VL")
    add_plan(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = (plan_parser() if argv[:1] == ["plan"] else build_parser()).parse_args(argv)
    try:
        code = args.func(args)
    except VLServeError as e:
        print(f"vlserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
