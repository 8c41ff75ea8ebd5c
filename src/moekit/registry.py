"""Name -> class registries (routers, experts): one small class so every seam registers the same way."""
from __future__ import annotations


class Registry:
    """Classes registered by name; ``kind`` names the seam in messages (``"router"``, ``"experts"``) and
    ``base`` is the class every registered one must subclass (None: any class)."""

    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: make a class available as ``get(name)``; it gets ``registry_name = name``."""

        def wrap(cls):
            if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} {name!r}: {cls!r} is not a subclass of "
                                f"{self.base.__module__}.{self.base.__qualname__}")
            known = self._classes.get(name)
            if known is not None and known is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {known.__name__}")
            self._classes[name] = cls
            cls.registry_name = name
            return cls

        return wrap

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as ``name``; ``ValueError`` naming the allowed values otherwise."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.kind}: unknown {self.kind} {name!r}; allowed: "
                             f"{', '.join(self.names())}") from None

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests, plugins reloaded)."""
        self._classes.pop(name, None)
