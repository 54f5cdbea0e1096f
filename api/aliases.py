"""Aliases at run time: which version serves a request for an alias, and live splits.

The choice is router/aliases.py's (pure). This holds what lives between requests: the round
robin of each split, and splits an operator changed with `POST /v1/admin/aliases/{name}`
(a rollback without a restart), kept until the next reload of models.yaml.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from config.models import Alias, Registry
from router.aliases import RoundRobin, Weights, allowed_weights, session_version
from router.errors import InvalidRequest

Split = tuple[tuple[str, int], ...]  # (version, weight), in the order written


class HasRegistry(Protocol):
    registry: Registry


class NoVersionAllowed(Exception):
    """A key limited to some models asked for an alias none of whose versions it may use."""

    def __init__(self, alias: str, versions: list[str]) -> None:
        super().__init__(alias)
        self.alias = alias
        self.versions = versions


class AliasTable:
    def __init__(self, manager: HasRegistry) -> None:
        self._manager = manager
        self._overrides: dict[str, tuple[tuple[str, int], ...]] = {}
        # One round robin per split as seen: the alias's whole split, or the part of it that a
        # key limited to some of its versions may use (at most one per such key).
        self._turns: dict[tuple[str, tuple[tuple[str, int], ...]], RoundRobin] = {}

    def _alias(self, name: str) -> Alias | None:
        return self._manager.registry.aliases.get(name)

    def weights(self, alias: Alias) -> Weights:
        return self._overrides.get(alias.name, alias.weights)

    def _split(self, alias: Alias, allowed: Collection[str] | None) -> tuple[Split, Split]:
        """The split in force (less versions that cannot run), and the part of it a request may
        be sent to: all of it, or (a key limited to some models that does not list the alias
        itself) the versions the key may use; NoVersionAllowed if none."""
        weights = tuple(self.weights(alias))
        disabled = self._manager.registry.disabled
        if any(v in disabled for v, _ in weights):  # models.yaml may name one that cannot run
            weights = tuple((v, w) for v, w in weights if v not in disabled) or weights
        if allowed is None or alias.name in allowed:
            return weights, weights
        usable = tuple(allowed_weights(weights, allowed))
        if not usable:
            raise NoVersionAllowed(alias.name, [v for v, _ in weights])
        return weights, usable

    def resolve(self, name: str, session: str | None, allowed: Collection[str] | None = None) -> str | None:
        """The version for a request naming `name`, or None when it is not an alias. `allowed`:
        the models the caller's key may use (None: any)."""
        alias = self._alias(name)
        if alias is None:
            return None
        split, weights = self._split(alias, allowed)
        if len(weights) == 1:
            return weights[0][0]
        if alias.sticky and session:
            return session_version(split, weights, session)
        turn = self._turns.get((name, weights))
        if turn is None:
            turn = self._turns[(name, weights)] = RoundRobin(weights)
        return turn.next()

    def peek(self, name: str, session: str | None, allowed: Collection[str] | None = None) -> str | None:
        """What `resolve` would answer now, without moving a split's round robin."""
        alias = self._alias(name)
        if alias is None:
            return None
        _, weights = self._split(alias, allowed)
        if len(weights) == 1 or (alias.sticky and session):
            return self.resolve(name, session, allowed)
        turn = self._turns.get((name, weights))
        if turn is None:
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
        disabled = self._manager.registry.disabled
        for version, weight in split.items():
            if version not in models:
                raise InvalidRequest(f"'{version}' is not a registered model")
            if version in disabled:
                raise InvalidRequest(f"'{version}' cannot run ({disabled[version]}): it cannot take traffic")
            if models[version].type != kind:
                raise InvalidRequest(f"'{version}' is a {models[version].type} model; '{name}' serves {kind}")
            if type(weight) is not int or weight <= 0:
                raise InvalidRequest(
                    f"the weight of '{version}' must be a whole number above 0, not {weight!r}"
                )
        self._overrides[name] = tuple(split.items())
        for turn in [t for t in self._turns if t[0] == name]:
            del self._turns[turn]  # the old split's turns: never asked for again
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
