"""vLLM's own parser, environment table and route table hold what the daemon launches and calls.

Runs where vllm==0.33.0 is installed (its own venv: .ci/run). On a CPU-only machine vLLM's
parser needs the platform set first, else "Failed to infer device type".
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import types
from pathlib import Path
from typing import Any

import pytest
import vllm.envs
import vllm.platforms
import vllm.platforms.cpu

vllm.platforms._current_platform = vllm.platforms.cpu.CpuPlatform()

from vllm.config.model import ModelConfig  # noqa: E402
from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args  # noqa: E402
from vllm.entrypoints.launchers.app import build_app  # noqa: E402  (what `vllm serve` builds)
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from backends.contract import env, routes  # noqa: E402
from backends.kserve import MODEL_DIR, command_line  # noqa: E402
from backends.kserve import PORT as KSERVE_PORT  # noqa: E402
from backends.vllm import DEFAULT_COMMAND  # noqa: E402
from config.models import ModelSpec  # noqa: E402
from tests.contract import fake  # noqa: E402
from tests.contract.asgi import unserved  # noqa: E402
from tests.contract.launches import PORT, flags, launches  # noqa: E402

# What vLLM reports it can do for each model type the daemon launches: a generating model,
# an embedding model, a cross-encoder reranker (one label).
TASKS = {"llm": ("generate",), "embedding": ("embed",), "reranker": ("classify",)}


def parser() -> FlexibleArgumentParser:
    return make_arg_parser(FlexibleArgumentParser())


def model_config(kind: str) -> Any:
    """What build_app reads of a pooling model's config (a real ModelConfig needs the model's
    files): no pooler task set, one label; get_pooling_task is vLLM's own method."""
    if kind == "llm":
        return None
    config = types.SimpleNamespace(
        pooler_config=types.SimpleNamespace(task=None),
        architectures=["BertModel" if kind == "embedding" else "BertForSequenceClassification"],
        hf_config=types.SimpleNamespace(num_labels=1),
    )
    config.get_pooling_task = types.MethodType(ModelConfig.get_pooling_task, config)
    return config


def app_for(kind: str, argv: list[str], dev_mode: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    if dev_mode:
        monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    else:
        monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    args = parser().parse_args(argv)
    return build_app(args, TASKS[kind], model_config(kind))


def test_the_command_the_daemon_runs_exists() -> None:
    assert DEFAULT_COMMAND[1:] == ("-m", "vllm.entrypoints.cli.main", "serve")
    assert importlib.util.find_spec("vllm.entrypoints.cli.main") is not None


def test_the_real_parser_reads_every_launch_line_as_meant() -> None:
    p = parser()
    default_share = p.parse_args(["m"]).gpu_memory_utilization
    spelt = {s for a in p._actions for s in a.option_strings}
    seen = 0
    for launch in launches("vllm"):
        spec, gpus = launch.spec, launch.ctx.gpu_ids
        assert flags(launch.argv) - spelt == set()
        args = p.parse_args(launch.argv)
        validate_parsed_serve_args(args)
        assert args.model_tag == spec.model_path
        if launch.ctx.uds:  # vLLM then serves on the socket alone (host and port ignored)
            assert args.uds == launch.ctx.uds and not {"--host", "--port"} & flags(launch.argv)
        else:
            assert (args.host, args.port, args.uds) == ("127.0.0.1", PORT, None)
        assert args.served_model_name == [spec.served_name]
        assert args.tensor_parallel_size == max(1, len(gpus))
        assert args.gpu_memory_utilization == (spec.gpu_memory or default_share)
        assert args.enable_sleep_mode is (spec.on_idle == "sleep")
        assert args.quantization == ("awq" if spec.format == "awq" else None)
        assert args.runner == ("pooling" if spec.type != "llm" else "auto")
        assert args.api_key is None  # the key goes by VLLM_API_KEY, never on the command line
        assert (launch.env.get("VLLM_API_KEY") is not None) is (launch.ctx.api_key is not None)
        assert (launch.env.get("VLLM_SERVER_DEV_MODE") == "1") is (spec.on_idle == "sleep")
        seen += 1
    assert seen == 576


def test_a_misspelt_flag_is_refused_by_the_real_parser() -> None:
    launch = next(launches("vllm"))
    with pytest.raises(SystemExit) as info:
        parser().parse_args([*launch.argv, "--gpu-memory-utilisation", "0.5"])
    assert info.value.code == 2


def test_every_environment_variable_the_daemon_sets_is_vllms() -> None:
    known = vllm.envs.environment_variables
    assert [e.name for e in env("vllm") if e.name not in known] == []


def test_keep_alive_and_key_are_read_as_the_daemon_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    launch = next(lc for lc in launches("vllm") if lc.ctx.api_key and lc.spec.on_idle == "sleep")
    for name, value in launch.env.items():
        monkeypatch.setenv(name, value)
    known = vllm.envs.environment_variables
    assert known["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]() == 75
    assert known["VLLM_API_KEY"]() == launch.ctx.api_key
    assert known["VLLM_SERVER_DEV_MODE"]() is True


@pytest.mark.parametrize("kind", ["llm", "embedding", "reranker"])
def test_every_route_the_daemon_uses_exists_as_launched(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for launch in launches("vllm"):
        if launch.spec.type != kind or launch.ctx.gpu_ids or launch.ctx.api_key:
            continue
        sleeps = launch.spec.on_idle == "sleep"
        app = app_for(kind, launch.argv, dev_mode=sleeps, monkeypatch=monkeypatch)
        wanted = [
            (r.method, r.path)
            for r in routes("vllm")
            if kind in r.types and (sleeps or r.use not in ("sleep", "wake"))
        ]
        assert unserved(app, wanted) == [], launch.argv


def test_without_dev_mode_there_are_no_sleep_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_for("llm", ["m", "--enable-sleep-mode"], dev_mode=False, monkeypatch=monkeypatch)
    assert unserved(app, [("POST", "/sleep"), ("POST", "/wake_up")]) == [
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
    ]


def test_the_fake_accepts_no_flag_and_serves_no_route_the_real_engine_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = {s for a in parser()._actions for s in a.option_strings}
    assert sorted(fake.options("vllm") - real) == []
    for dev_mode in (False, True):
        environ = {"VLLM_SERVER_DEV_MODE": "1"} if dev_mode else {}
        served = fake.routes(["vllm", "m", "--enable-sleep-mode"], environ)
        apps = [app_for(kind, ["m", "--enable-sleep-mode"], dev_mode, monkeypatch) for kind in TASKS]
        lacking = [route for route in served if all(unserved(app, [route]) for app in apps)]
        assert lacking == [], f"dev mode {dev_mode}"


def test_the_exported_kserve_command_line_runs_the_model_kserve_mounts_at_its_port() -> None:
    """`python main.py export kserve`: the container runs `vllm serve /mnt/models ...`."""
    for tensor, kind, fmt in itertools.product((1, 2), ("llm", "embedding", "reranker"), ("hf", "awq")):
        entry = {"name": "m", "backend": "vllm", "model_path": "org/model", "served_model_name": "served",
                 "type": kind, "format": fmt, "args": ["--max-model-len", "4096"]}  # fmt: skip
        spec = ModelSpec.model_validate(entry)
        command, argv = command_line(spec, tensor)
        assert command == ["vllm", "serve"]
        args = parser().parse_args(argv)
        validate_parsed_serve_args(args)
        assert (args.model_tag, args.port, args.host) == (MODEL_DIR, KSERVE_PORT, "0.0.0.0")
        assert args.served_model_name == ["served"] and args.tensor_parallel_size == tensor
        assert args.max_model_len == 4096 and args.runner == ("pooling" if kind != "llm" else "auto")
        assert args.quantization == ("awq" if fmt == "awq" else None)


def _route_set(app: Any) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes:
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


def test_the_dev_mode_routes_listed_in_the_docs_are_vllms(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/engine-security.md lists what VLLM_SERVER_DEV_MODE=1 adds (issue 25, defect 8): the
    same set as vLLM's own app, launched as the daemon launches a model for sleep."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine-security.md").read_text()
    table = doc.split("<!-- vllm-dev-mode-routes")[1].split("\n\n")[0]
    listed = {(m, p.strip("`")) for m, p in re.findall(r"^\| (GET|POST) \| (`[^`]+`) \|", table, re.M)}
    argv = ["m", "--enable-sleep-mode"]
    plain = _route_set(app_for("llm", argv, dev_mode=False, monkeypatch=monkeypatch))
    monkeypatch.undo()
    dev = _route_set(app_for("llm", argv, dev_mode=True, monkeypatch=monkeypatch))
    assert len(listed) == 23 and dev - plain == listed
