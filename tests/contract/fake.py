"""The fake engine's flags and routes, to be held to the real engine's (tests/contract/)."""

from __future__ import annotations

import argparse

from tests import fake_engine
from tests.fake_gpu import FakeGpu

# Everything the fake serves of its own lives under this prefix (its knobs are FAKE_* variables).
OWN_PREFIX = "/fake/"


def options(dialect: str) -> set[str]:
    """Every option string the fake accepts in `dialect`."""
    parser = fake_engine.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s for action in sub.choices[dialect]._actions for s in action.option_strings} - {"-h", "--help"}


def routes(argv: list[str], env: dict[str, str]) -> set[tuple[str, str]]:
    """(method, path) of every route the fake serves when launched with `argv` (dialect first)
    and `env`, but its own under OWN_PREFIX."""
    args = fake_engine.parse_args(argv)
    engine = fake_engine.FakeEngine(args, fake_engine.Knobs(env), FakeGpu(args, env))
    found = set()
    for route in engine.app().router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method != "HEAD" and not path.startswith(OWN_PREFIX):
            found.add((route.method, path))
    return found
