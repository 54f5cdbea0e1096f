"""llama-cpp-python's own parser, settings and route table hold what the daemon launches and calls."""

from __future__ import annotations

import argparse

import pytest
from fastapi import FastAPI
from llama_cpp.server.app import router
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

from backends.contract import env, routes
from tests.contract import fake
from tests.contract.asgi import unserved
from tests.contract.launches import PORT, flags, launches


def real_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()  # as llama_cpp/server/__main__.py builds it
    add_args_from_model(parser, Settings)
    parser.add_argument("--config_file", type=str)
    return parser


def real_app() -> FastAPI:
    app = FastAPI()  # create_app: a FastAPI app (its default /openapi.json) with the module's router
    app.include_router(router)
    return app


def test_the_real_parser_reads_every_launch_line_as_meant() -> None:
    parser = real_parser()
    spelt = {s for a in parser._actions for s in a.option_strings}
    seen = 0
    for launch in launches("llamacpp"):
        assert flags(launch.argv) - spelt == set()
        args = parser.parse_args(launch.argv)
        server = parse_model_from_args(ServerSettings, args)
        model = parse_model_from_args(ModelSettings, args)
        assert (server.host, server.port) == ("127.0.0.1", PORT)
        assert model.model == launch.spec.model_path and model.model_alias == launch.spec.served_name
        assert server.interrupt_requests is False
        assert model.embedding is (launch.spec.type == "embedding")
        seen += 1
    assert seen == 8


def test_a_misspelt_flag_is_refused_by_the_real_parser() -> None:
    launch = next(launches("llamacpp"))
    with pytest.raises(SystemExit) as info:
        real_parser().parse_args([*launch.argv, "--interupt_requests", "false"])
    assert info.value.code == 2


def test_every_route_the_daemon_uses_exists() -> None:
    assert unserved(real_app(), [(r.method, r.path) for r in routes("llamacpp")]) == []


def test_the_launch_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    (key,) = env("llamacpp")
    monkeypatch.setenv(key.name, "k" * 24)
    assert ServerSettings().api_key == "k" * 24


def test_the_fake_accepts_no_flag_and_serves_no_route_the_real_engine_lacks() -> None:
    real = {s for a in real_parser()._actions for s in a.option_strings}
    assert sorted(fake.options("llamacpp") - real) == []
    served = fake.routes(["llamacpp", "--model", "m.gguf"], {})
    assert unserved(real_app(), served) == []
