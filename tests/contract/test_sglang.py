"""SGLang's own parser, environment table and route table hold what the daemon launches and calls.

Runs where sglang==0.5.23 is installed (its own venv: .ci/run). `prepare_server_args` parses a
full argv on CPU; `http_server` defines its FastAPI `app` at module level.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import warnings

import pytest

with warnings.catch_warnings():  # its import warns about CUDA-only kernels: not ours to act on
    warnings.simplefilter("ignore")
    from sglang.srt.entrypoints.http_server import app
    from sglang.srt.environ import envs
    from sglang.srt.server_args import ServerArgs, prepare_server_args

from backends.contract import env, routes
from backends.kserve import MODEL_DIR, command_line
from backends.kserve import PORT as KSERVE_PORT
from backends.sglang import DEFAULT_COMMAND
from config.models import ModelSpec
from tests.contract import fake
from tests.contract.asgi import unserved
from tests.contract.launches import PORT, flags, launches


def real_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()  # as prepare_server_args builds it
    ServerArgs.add_cli_args(parser)
    return parser


def test_the_command_the_daemon_runs_exists() -> None:
    assert DEFAULT_COMMAND[1:] == ("-m", "sglang.launch_server")
    assert importlib.util.find_spec("sglang.launch_server") is not None


def test_the_real_parser_reads_every_launch_line_as_meant() -> None:
    default_share = prepare_server_args(["--model-path", "m"]).mem_fraction_static
    spelt = {s for a in real_parser()._actions for s in a.option_strings}
    seen = 0
    for launch in launches("sglang"):
        spec, ctx = launch.spec, launch.ctx
        assert flags(launch.argv) - spelt == set()
        args = prepare_server_args(launch.argv)
        assert args.model_path == spec.model_path
        assert (args.host, args.port) == ("127.0.0.1", PORT)
        assert args.served_model_name == spec.served_name
        assert args.tp_size == max(1, len(ctx.gpu_ids))
        if spec.gpu_memory is not None:
            assert args.mem_fraction_static == spec.gpu_memory
        else:  # unset: SGLang's own choice, as for any model launched without the flag
            assert args.mem_fraction_static == default_share
        assert args.enable_memory_saver is (spec.on_idle == "sleep")
        assert args.quantization == ("awq" if spec.format == "awq" else None)
        assert args.is_embedding is (spec.type != "llm")
        assert args.api_key == ctx.api_key
        assert args.max_running_requests == ctx.sglang_max_running_requests
        assert args.max_total_tokens == (ctx.sglang_max_total_tokens or None)
        seen += 1
    assert seen == 288


def test_a_misspelt_flag_is_refused_by_the_real_parser() -> None:
    launch = next(launches("sglang"))
    with pytest.raises(SystemExit) as info:
        prepare_server_args([*launch.argv, "--enable-memory-savers"])
    assert info.value.code == 2


def test_every_environment_variable_the_daemon_sets_is_sglangs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [e.name for e in env("sglang") if not hasattr(type(envs), e.name)] == []
    launch = next(launches("sglang"))
    monkeypatch.setenv("SGLANG_TIMEOUT_KEEP_ALIVE", launch.env["SGLANG_TIMEOUT_KEEP_ALIVE"])
    assert envs.SGLANG_TIMEOUT_KEEP_ALIVE.get() == 75


def test_every_route_the_daemon_uses_exists() -> None:
    """SGLang registers every route on one module-level app, whatever the launch."""
    assert unserved(app, [(r.method, r.path) for r in routes("sglang")]) == []


def test_the_fake_accepts_no_flag_and_serves_no_route_the_real_engine_lacks() -> None:
    real = {s for a in real_parser()._actions for s in a.option_strings}
    assert sorted(fake.options("sglang") - real) == []
    served = fake.routes(["sglang", "--model-path", "m", "--enable-memory-saver"], {})
    assert unserved(app, served) == []


def test_the_memory_saver_behind_on_idle_sleep_is_installed_with_sglang() -> None:
    """--enable-memory-saver needs the torch_memory_saver package; without it SGLang's adapter
    raises at start. It comes with sglang 0.5.23's own requirements."""
    from sglang.srt.utils.torch_memory_saver_adapter import TorchMemorySaverAdapter

    assert TorchMemorySaverAdapter.create(enable=True).enabled is True
    assert TorchMemorySaverAdapter.create(enable=False).enabled is False  # what the routes use without it


def test_the_exported_kserve_command_line_runs_the_model_kserve_mounts_at_its_port() -> None:
    """`python main.py export kserve`: issue 25 found the container ran `python -m
    sglang.launch_server` with no --model-path and no --port; SGLang also listens on loopback
    unless told otherwise, out of reach of KServe's probes."""
    for tensor, kind, fmt in itertools.product((1, 2), ("llm", "embedding"), ("hf", "awq")):
        entry = {"name": "m", "backend": "sglang", "model_path": "org/model", "served_model_name": "served",
                 "type": kind, "format": fmt, "args": ["--context-length", "4096"]}  # fmt: skip
        spec = ModelSpec.model_validate(entry)
        command, argv = command_line(spec, tensor)
        assert command == ["python", *DEFAULT_COMMAND[1:]]
        args = prepare_server_args(argv)
        assert (args.model_path, args.port, args.host) == (MODEL_DIR, KSERVE_PORT, "0.0.0.0")
        assert args.served_model_name == "served" and args.tp_size == tensor
        assert args.context_length == 4096 and args.is_embedding is (kind != "llm")
        assert args.quantization == ("awq" if fmt == "awq" else None)
