"""Job types: ``@handler("name")`` registers a coroutine and the pydantic model of its input."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from jobstream.errors import ValidationFailed, pydantic_errors

if TYPE_CHECKING:
    from jobstream.producer import JobContext
    from jobstream.settings import Settings

#: A job type with no built-in worker: an outside producer appends its events over HTTP.
EXTERNAL = "external"

HandlerFunc = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class HandlerSpec:
    name: str
    func: HandlerFunc
    input_model: type[BaseModel] | None
    #: Safe to run again from the start after its worker died.
    idempotent: bool = False
    timeout_s: float | None = None

    def parse_input(self, raw: Mapping[str, Any]) -> Any:
        """The handler's input, validated; raises ValidationFailed with field errors."""
        if self.input_model is None:
            return dict(raw)
        try:
            return self.input_model.model_validate(raw)
        except ValidationError as exc:
            errors = [{**err, "loc": ["input", *err["loc"]]} for err in pydantic_errors(exc)]
            raise ValidationFailed(f"Invalid input for job type '{self.name}'.", errors=errors) from None

    async def run(self, ctx: JobContext, raw_input: Mapping[str, Any]) -> Any:
        return await self.func(ctx, self.parse_input(raw_input))


class Registry:
    """Job types by name: those registered here, then those of the registries it includes (looked
    up live, so a handler registered there later is known here too)."""

    def __init__(self, *, include: Iterable[Registry] = ()) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        self._included = tuple(include)

    def register(
        self, name: str, func: HandlerFunc, *, idempotent: bool = False, timeout_s: float | None = None
    ) -> HandlerSpec:
        if name == EXTERNAL:
            raise ValueError(f"'{EXTERNAL}' is reserved for jobs fed by outside producers")
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"handler {name!r} must be an async function, got {func!r}")
        spec = HandlerSpec(name, func, _input_model(func), idempotent, timeout_s)
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> HandlerSpec | None:
        if name in self._specs:
            return self._specs[name]
        for included in self._included:
            spec = included.get(name)
            if spec is not None:
                return spec
        return None

    def knows(self, name: str) -> bool:
        return name == EXTERNAL or self.get(name) is not None

    def names(self) -> list[str]:
        return sorted({*self._specs, *(name for included in self._included for name in included.names())})


def _input_model(func: HandlerFunc) -> type[BaseModel] | None:
    """The pydantic model annotated on the handler's second parameter, if any."""
    params = list(inspect.signature(func).parameters)
    if len(params) < 2:
        raise TypeError(f"handler {func.__qualname__} must accept (ctx, input)")
    hint = typing.get_type_hints(func).get(params[1])
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


#: The registry `@handler` writes to: the application's job types. Never the built-in demo
#: types, which live in `jobstream.demo.demo_registry` and are served only where `registry_for`
#: adds them.
default_registry = Registry()


def handler(
    name: str, *, idempotent: bool = False, timeout_s: float | None = None, registry: Registry | None = None
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Register ``async def f(ctx: JobContext, input: Model) -> result`` as the job type ``name``."""

    def decorate(func: HandlerFunc) -> HandlerFunc:
        (registry or default_registry).register(name, func, idempotent=idempotent, timeout_s=timeout_s)
        return func

    return decorate


def load_modules(modules: Iterable[str]) -> None:
    """Import the modules that define handlers, so that their ``@handler`` functions register."""
    for module in modules:
        importlib.import_module(module)


def registry_for(settings: Settings) -> Registry:
    """The job types a gateway or worker run with ``settings`` serves: the application's, and the
    built-in ``demo.*`` types only when ``settings.demo`` (JOBSTREAM_DEMO) is on.

    Decided per gateway or worker, from its own settings, never by what a process happens to have
    imported: one process (the test suite, an app embedding jobstream) can hold gateways with and
    without the demo types, and a gateway whose demo setting is off answers 422 for them whatever
    else imported `jobstream.demo`."""
    if not settings.demo:
        return default_registry
    from jobstream.demo import demo_registry  # only when on: nothing else needs the demo module

    return Registry(include=(default_registry, demo_registry))
