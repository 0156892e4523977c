"""deploy/ and docs/multi-node.md against the real CLI. Every vlserve command line they hold (compose services with
the example settings, the image's ENTRYPOINT and CMD, the guide's bash blocks) must parse with vlserve's own parser,
so a renamed flag fails here rather than on a user's cluster; compose keeps what serving across machines needs."""

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from vlserve.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GUIDE = REPO / "docs" / "multi-node.md"
# Compose's ${NAME}, ${NAME:-x}, ${NAME-x}, ${NAME:+x}, ${NAME+x}, ${NAME:?x}, ${NAME?x}; x may hold one ${...}
REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[-+?])((?:[^{}]|\$\{[^{}]*\})*))?\}")
SEPARATORS = {"&&", "||", ";", "|", "&"}
LAYOUT = ("tensor_parallel_size", "pipeline_parallel_size", "mm_encoder_tp_mode", "gpu_memory_utilization",
          "max_num_batched_tokens", "max_model_len")  # with --mm-processor-kwargs: what the planner sized


def example_env(**overrides: str) -> dict[str, str]:
    """deploy/.env.example as Compose reads it (KEY=VALUE lines), with a key set as .env must have it."""
    env = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return {**env, "VLSERVE_API_KEY": "test-key", **overrides}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation; every variable must be one .env.example defines (a typo fails here), and
    no other `$` may be left: Compose would replace a shell's $VAR with the host's value before the shell runs."""
    def value(m: re.Match) -> str:
        name, op, operand = m.groups()
        assert name in env, f"compose uses ${{{name}}}, which deploy/.env.example does not define"
        is_set = bool(env[name]) if op and op.startswith(":") else True
        if op in (":-", "-"):
            return env[name] if is_set else interpolate(operand, env)
        if op in (":+", "+"):
            return interpolate(operand, env) if is_set else ""
        if op in (":?", "?") and not is_set:
            raise ValueError(f"{name}: {operand}")
        return env[name]
    result = REFERENCE.sub(value, text)
    assert "$" not in result, f"{text!r}: a $ that Compose would interpolate itself"
    return result


def interpolate_values(node, env: dict[str, str]):
    """As Compose does: the YAML is parsed first, then every string value is interpolated."""
    if isinstance(node, dict):
        return {key: interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_values(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def compose(env: dict[str, str]) -> dict:
    return interpolate_values(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), env)


def simple_commands(script: str) -> list[list[str]]:
    """A shell line split into its simple commands (at &&, ||, ;, | and &), each a list of words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands = [[]]
    for word in lexer:
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def vlserve_argv(words: list[str]) -> list[str] | None:
    """The arguments vlserve gets from a command line: `vlserve ...`, `exec vlserve ...`,
    `docker compose exec SERVICE vlserve ...` or `docker run ... IMAGE ...` with a vlserve image."""
    if words[0] == "exec":
        words = words[1:]
    if words[0] == "vlserve":
        return words[1:]
    if words[:3] == ["docker", "compose", "exec"] and "vlserve" in words:
        return words[words.index("vlserve") + 1:]
    image = next((i for i, w in enumerate(words) if w.startswith("vlserve:")), None)
    if words[:2] == ["docker", "run"] and image is not None:
        return words[image + 1:]
    return None


def without_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Full flag names only: an abbreviation that parses today (--node-ip) breaks once a flag shares its prefix."""
    parser.allow_abbrev = False
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sub in action.choices.values():
            without_abbreviations(sub)
    return parser


def parse(argv: list[str]):
    """vlserve's parser on argv; argparse's complaint (an unknown or renamed flag) becomes the failure message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return without_abbreviations(build_parser()).parse_args(argv)
    except SystemExit as e:
        if e.code:
            pytest.fail(f"`vlserve {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")
        return None  # --help


def head_commands(env: dict[str, str]) -> list:
    head = compose(env)["services"]["head"]
    assert head["entrypoint"] == ["/bin/sh", "-c"]
    commands = [vlserve_argv(words) for words in simple_commands(head["command"][0])]
    assert None not in commands, "the head runs vlserve commands only"
    return [parse(argv) for argv in commands]


def worker_command(env: dict[str, str]):
    worker = compose(env)["services"]["worker"]
    assert "entrypoint" not in worker  # the image's: vlserve
    return parse(shlex.split(worker["command"]))


def test_head_starts_ray_then_serves_the_model_over_the_cluster():
    env = example_env()
    ray_head, serve = head_commands(env)
    assert (ray_head.command, ray_head.cluster_command) == ("cluster", "head")
    assert ray_head.port == int(env["VLSERVE_RAY_PORT"]) and ray_head.node_ip_address == env["VLSERVE_HEAD_IP"]
    assert ray_head.gpus is None and not ray_head.block  # every card; serve follows in the same container
    assert serve.command == "serve" and serve.model == env["VLSERVE_MODEL_DIR"]
    assert (serve.tensor_parallel_size, serve.pipeline_parallel_size) == (8, 2)
    assert serve.distributed_executor_backend == "ray" and serve.host == "0.0.0.0"


def test_worker_joins_the_head_and_stays_in_the_foreground():
    env = example_env()
    join = worker_command(env)
    assert (join.command, join.cluster_command) == ("cluster", "join")
    assert join.head == f"{env['VLSERVE_HEAD_IP']}:{env['VLSERVE_RAY_PORT']}" and join.block
    assert join.interface is None and join.gpus is None  # detected on each machine; every card


def test_interface_and_cards_can_be_chosen_per_machine():
    env = example_env(VLSERVE_INTERFACE="enp65s0f1", VLSERVE_GPUS="0,3,4")
    join = worker_command(env)
    assert (join.interface, join.gpus) == ("enp65s0f1", "0,3,4")
    assert head_commands(env)[0].gpus == "0,3,4"


def test_services_share_the_host_network_shm_model_and_restart():
    env = example_env()
    services = compose(env)["services"]
    assert set(services) == {"head", "worker"}
    for name, service in services.items():
        assert service["profiles"] == [name]
        assert service["network_mode"] == "host"  # Ray, Gloo and NCCL advertise the host's own addresses
        assert re.fullmatch(r"\d+gb", service["shm_size"]) and int(service["shm_size"][:-2]) >= 1
        assert service["restart"] == "unless-stopped"
        model = env["VLSERVE_MODEL_DIR"]
        assert f"{model}:{model}:ro" in service["volumes"]  # the same path on every node, as serve checks
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_head_outwaits_the_drain():
    """Docker's SIGKILL must come after serve has had --shutdown-timeout to finish in-flight requests."""
    env = example_env()
    grace = compose(env)["services"]["head"]["stop_grace_period"]
    assert float(grace.removesuffix("s")) > head_commands(env)[1].shutdown_timeout


def test_head_requires_an_api_key():
    with pytest.raises(ValueError, match="VLSERVE_API_KEY"):
        compose(example_env(VLSERVE_API_KEY=""))


@pytest.mark.parametrize("text, message", [("${VLSERVE_NOPE:-x}", "VLSERVE_NOPE"), ("sh -c 'echo $HOME'", r"a \$")])
def test_unknown_variable_fails(text, message):
    with pytest.raises(AssertionError, match=message):
        interpolate(text, example_env())


@pytest.mark.parametrize("flag", ["--interface-name", "--inter"])  # renamed; abbreviated
def test_flag_not_named_in_full_fails(flag):
    with pytest.raises(pytest.fail.Exception, match=f"unrecognized arguments: {flag}"):
        parse(["cluster", "join", "10.0.0.1:6379", flag, "eth0"])


def test_image_runs_the_vlserve_console_script():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.MULTILINE).group(1))
    assert entrypoint == ["vlserve"] and "vlserve" in scripts
    parse(yaml.safe_load(re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE).group(1)))


def test_image_installs_extras_the_package_declares():
    extras = re.search(r'pip install .*"/src\[([\w,]+)\]"', (DEPLOY / "Dockerfile").read_text()).group(1)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ray" in extras.split(",")  # the executor across machines
    assert set(extras.split(",")) <= set(declared), f"pyproject.toml declares extras {sorted(declared)}"


def guide_commands() -> list[list[str]]:
    blocks = re.findall(r"^```bash\n(.*?)^```", GUIDE.read_text(), re.DOTALL | re.MULTILINE)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    found = [vlserve_argv(words) for line in lines for words in simple_commands(line)]
    return [argv for argv in found if argv is not None]


def test_guide_commands_parse():
    commands = guide_commands()
    parsed = [parse(argv) for argv in commands]
    steps = {" ".join(argv[:2]) if argv[0] == "cluster" else argv[0] for argv in commands}
    assert {"plan", "doctor", "cluster head", "cluster join", "cluster status", "serve"} <= steps
    serve = next(a for a in parsed if a.command == "serve")
    assert (serve.tensor_parallel_size, serve.pipeline_parallel_size, serve.distributed_executor_backend) == \
        (8, 2, "ray")


def layout(args) -> dict:
    return {**{knob: getattr(args, knob) for knob in LAYOUT}, "mm": json.loads(args.mm_processor_kwargs or "{}")}


def test_served_layout_is_one_the_planner_finds_feasible(capsys):
    """The guide's plan with the layout flags it serves with exits 0 (FEASIBLE), and the guide's and compose's
    serve run exactly that layout."""
    checked = [argv for argv in guide_commands() if argv[0] == "plan" and "-tp" in argv]
    assert len(checked) == 1
    assert main(checked[0]) == 0, capsys.readouterr().out
    serves = [parse(argv) for argv in guide_commands() if argv[0] == "serve"] + [head_commands(example_env())[1]]
    for serve in serves:
        assert layout(serve) == layout(parse(checked[0]))
