"""The base of gradwatch's settings objects and the keyword shorthands that fill them in.

`CheckOptions`, `RecordSettings` and `AlertSettings` are frozen, keyword-only dataclasses on
this base: each validates its fields when it is built and remembers which of them were given
(`given`), so an entry point's keyword shorthands (`check_module(..., eps=1e-6)`,
`GradWatch(tracking_uri=...)`) can fill in what the object leaves out, and a setting given
both ways is refused with a `ConfigError` that names it (never its value: URLs hold secrets).

Imports: gradwatch.common (the errors).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeVar

from gradwatch.common.errors import ConfigError

__all__ = ["DEFAULT", "Default", "Settings", "with_shorthands"]

S = TypeVar("S", bound="Settings")


class Default(enum.Enum):
    """The type of `DEFAULT`: a setting not given, so the default applies (for a settings
    field, the entry point's own default; for a keyword shorthand, the settings object's)."""

    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = Default.DEFAULT


class Settings:
    """Base of the settings dataclasses: `given` holds the fields passed to the constructor.

    A field whose `None` means "the default" (listed in `NONE_IS_DEFAULT`) is set to its
    default and does not count as given, nor does `DEFAULT`; the repr shows the given fields
    only, which is what the object says beyond the defaults.
    """

    #: Fields for which None means the default (as the keyword shorthands always allowed).
    NONE_IS_DEFAULT: ClassVar[frozenset[str]] = frozenset()
    _given: frozenset[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        object.__setattr__(self, "_given", frozenset(
            name for name, value in kwargs.items() if not _unset(cls, name, value)))
        return self

    @property
    def given(self) -> frozenset[str]:
        """The fields given to the constructor (or by a keyword shorthand), not defaulted."""
        return getattr(self, "_given", frozenset())

    def _fill_defaults(self) -> None:
        """In `__post_init__`: None (where it means the default) becomes the default."""
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            if item.name in self.NONE_IS_DEFAULT and getattr(self, item.name) is None:
                value = (item.default_factory() if item.default_factory
                         is not dataclasses.MISSING else item.default)
                object.__setattr__(self, item.name, value)

    def __repr__(self) -> str:
        shown = [f"{item.name}={getattr(self, item.name)!r}"
                 for item in dataclasses.fields(self)  # type: ignore[arg-type]
                 if item.name in self.given]
        return f"{type(self).__name__}({', '.join(shown)})"


def _unset(cls: type[Settings], name: str, value: Any) -> bool:
    return value is DEFAULT or (value is None and name in cls.NONE_IS_DEFAULT)


def with_shorthands(
    cls: type[S],
    settings: S | Mapping[str, Any] | None,
    shorthands: Mapping[str, Any],
    *,
    argument: str,
    entry: str,
    fields: Mapping[str, str] | None = None,
) -> S:
    """`settings` (the object passed as `argument=`, a dict of its fields, or None) with the
    keyword shorthands that were given (not `DEFAULT`) filled in. `fields` maps a keyword to
    its field where the names differ (`mlflow` → `enabled`). A setting given both ways, or an
    `argument` of the wrong type, is a ConfigError saying which and how to fix it."""
    fields = fields or {}
    if settings is None:
        settings = cls()
    elif isinstance(settings, Mapping) and not isinstance(settings, cls):
        known = [item.name for item in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(str(key) for key in settings if key not in known)
        if unknown:
            raise ConfigError(
                f"{entry} got {argument}= with unknown field(s) {', '.join(unknown)}; "
                f"{cls.__name__} has {', '.join(known)}."
            )
        settings = cls(**settings)
    elif not isinstance(settings, cls):
        raise ConfigError(
            f"{entry} takes {argument}= as a gradwatch.{cls.__name__} (or a dict of its "
            f"fields), got {type(settings).__name__}; e.g. {argument}={cls.__name__}(...)."
        )
    given = {fields.get(key, key): value for key, value in shorthands.items()
             if not _unset(cls, fields.get(key, key), value)}
    twice = [key for key, value in shorthands.items()
             if fields.get(key, key) in given and fields.get(key, key) in settings.given]
    if twice:
        described = ", ".join(
            f"{key}= and {argument}={cls.__name__}({fields.get(key, key)}=...)" for key in twice
        )
        raise ConfigError(
            f"{entry} got {'a setting' if len(twice) == 1 else 'settings'} both as a keyword "
            f"and in {argument}=: {described}. Give each setting once: drop the keyword, or "
            f"leave the field out of the {cls.__name__}."
        )
    if not given:
        return settings
    merged = dataclasses.replace(settings, **given)  # type: ignore[type-var]
    object.__setattr__(merged, "_given", settings.given | frozenset(given))
    return merged
