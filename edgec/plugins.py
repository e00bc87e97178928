"""Entry-point plugins: passes, targets and backends that users add without forking edgec.

Each kind lives in its own entry-point group. Plugins are loaded the first time a registry is
asked for a name it does not know built in (or for the full list), never at import time, and a
plugin that reuses a taken name is an error rather than a silent override.
"""

from __future__ import annotations

from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

from edgec.errors import UserError

T = TypeVar("T")


class DuplicateNameError(UserError):
    pass


class Registry(Generic[T]):
    """Names to objects, with built-ins registered in code and plugins found through entry points.

    `kind` is a word for messages ("pass", "target"); `group` is the entry-point group.
    """

    def __init__(self, kind: str, group: str, builtins: Callable[[], dict[str, T]] | None = None):
        self.kind = kind
        self.group = group
        self._builtins = builtins
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._builtins_loaded = builtins is None
        self._plugins_loaded = False

    def register(self, name: str, item: T, origin: str = "edgec") -> T:
        if name in self._items:
            raise DuplicateNameError(
                f"{self.kind} name {name!r} from {origin} is already registered by {self._origin[name]}",
                "rename one of them",
            )
        self._items[name] = item
        self._origin[name] = origin
        return item

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for name, item in self._builtins().items():
                self.register(name, item)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.group):
            origin = f"entry point {ep.name!r} ({ep.value})"
            if ep.dist is not None and ep.dist.name == "edgec":
                origin = "edgec"
                if ep.name in self._items:  # built-ins may also be declared as entry points
                    continue
            try:
                item = ep.load()
            except Exception as exc:  # a broken plugin must not hide which one it was
                raise UserError(
                    f"could not load {self.kind} plugin {origin}: {type(exc).__name__}: {exc}",
                    "fix or uninstall that package",
                ) from exc
            declared = getattr(item, "name", None)
            if isinstance(declared, str) and declared != ep.name:
                # Records, pipelines and the debug counter all use the name; two names would split them.
                raise UserError(
                    f"{self.kind} plugin {origin} calls itself {declared!r} but is registered as {ep.name!r}",
                    "make the entry-point name and the class's name the same",
                )
            self.register(ep.name, item, origin)

    def get(self, name: str) -> T:
        self._load_builtins()
        if name not in self._items:
            self._load_plugins()
        if name not in self._items:
            raise UserError(
                f"unknown {self.kind} {name!r}",
                f"choose one of: {', '.join(sorted(self.names()))}",
            )
        return self._items[name]

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origin[name]

    def names(self) -> list[str]:
        self._load_builtins()
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        if name not in self._items:
            self._load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
