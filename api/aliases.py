"""Aliases at run time: which version serves a request for an alias, and live splits.

The choice is router/aliases.py's (pure). This holds what lives between requests: the round
robin of each split, and splits an operator changed with `POST /v1/admin/aliases/{name}`
(a rollback without a restart), kept until the next reload of models.yaml.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Protocol

from config.models import Alias, Registry
from router.aliases import RoundRobin, Weights, for_session
from router.errors import InvalidRequest


class HasRegistry(Protocol):
    registry: Registry


class AliasTable:
    def __init__(self, manager: HasRegistry) -> None:
        self._manager = manager
        self._overrides: dict[str, tuple[tuple[str, int], ...]] = {}
        self._turns: dict[str, RoundRobin] = {}

    def _alias(self, name: str) -> Alias | None:
        return self._manager.registry.aliases.get(name)

    def weights(self, alias: Alias) -> Weights:
        return self._overrides.get(alias.name, alias.weights)

    def resolve(self, name: str, session: str | None) -> str | None:
        """The version for a request naming `name`, or None when it is not an alias."""
        alias = self._alias(name)
        if alias is None:
            return None
        weights = self.weights(alias)
        if len(weights) == 1:
            return weights[0][0]
        if alias.sticky and session:
            return for_session(weights, session)
        turn = self._turns.get(name)
        if turn is None or turn.weights != list(weights):
            turn = self._turns[name] = RoundRobin(weights)
        return turn.next()

    def peek(self, name: str, session: str | None) -> str | None:
        """What `resolve` would answer now, without moving a split's round robin."""
        alias = self._alias(name)
        if alias is None:
            return None
        weights = self.weights(alias)
        if len(weights) == 1 or (alias.sticky and session):
            return self.resolve(name, session)
        turn = self._turns.get(name)
        if turn is None or turn.weights != list(weights):
            return RoundRobin(weights).next()
        return copy.deepcopy(turn).next()

    def set_split(self, name: str, split: Any) -> dict[str, Any]:
        """An operator's split (validated as models.yaml's is); kept until the next reload."""
        alias = self._alias(name)
        if alias is None:
            raise KeyError(name)
        models = self._manager.registry.models
        if not isinstance(split, dict) or not split:
            raise InvalidRequest('Give {"split": {"<model>": <weight>, ...}}')
        kind = models[alias.weights[0][0]].type
        for version, weight in split.items():
            if version not in models:
                raise InvalidRequest(f"'{version}' is not a registered model")
            if models[version].type != kind:
                raise InvalidRequest(f"'{version}' is a {models[version].type} model; '{name}' serves {kind}")
            if type(weight) is not int or weight <= 0:
                raise InvalidRequest(
                    f"the weight of '{version}' must be a whole number above 0, not {weight!r}"
                )
        self._overrides[name] = tuple(split.items())
        return self.describe(alias)

    def reloaded(self) -> list[str]:
        """A reload: models.yaml wins. Returns the aliases whose live split it replaced."""
        dropped = sorted(self._overrides)
        self._overrides.clear()
        self._turns.clear()
        return dropped

    def describe(self, alias: Alias) -> dict[str, Any]:
        return {
            "name": alias.name,
            "split": dict(self.weights(alias)),
            "sticky": "session" if alias.sticky else "none",
            "overridden": alias.name in self._overrides,
        }

    def listing(self) -> list[dict[str, Any]]:
        return [self.describe(a) for a in self.aliases.values()]

    @property
    def aliases(self) -> Mapping[str, Alias]:
        return self._manager.registry.aliases
