"""Chat templates are code from the model folder: compiled and rendered in Jinja's immutable sandbox.

As transformers renders them (``utils/chat_template_utils.py``): ``ImmutableSandboxedEnvironment``
with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, the ``{% generation %}``
tag, and the helpers templates call (``raise_exception``, ``strftime_now``, ``tojson`` with
``indent``/``ensure_ascii``). Unlike a plain ``jinja2.Environment``, the sandbox refuses
``__class__``/``__globals__`` and friends, so a template cannot reach Python. Beyond transformers,
a render has a work budget (range items, ``*`` and ``**`` results, integer call arguments), so a
template cannot hang or exhaust memory either. Every failure is one ``TokenizerError``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mixport.errors import TokenizerError

if TYPE_CHECKING:
    import jinja2

MAX_ITEMS = 1_000_000  # range items per render, and the longest str/list a `*` may build
MAX_INT_ARG = 1_000_000  # the largest integer a template may pass to a call (str.center(10**9)...)
_budget: ContextVar[list[int] | None] = ContextVar("chat_template_budget", default=None)


def _one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _spend(items: int) -> None:
    left = _budget.get()
    if left is not None:
        left[0] -= items
        if left[0] < 0:
            _refuse(f"more than {MAX_ITEMS} range items in one render")


def _refuse(why: str) -> None:
    from jinja2.exceptions import SecurityError

    raise SecurityError(why)


def _check_ints(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if any(isinstance(a, int) and abs(a) > MAX_INT_ARG for a in (*args, *kwargs.values())):
        _refuse(f"an integer argument beyond {MAX_INT_ARG}")


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        _refuse(f"an underscore-prefixed name in a namespace: {name!r}")


def _bounded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses huge integer arguments (its ``jinja_pass_arg`` marker is kept by ``wraps``)."""

    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_ints(args, kwargs)
        return fn(*args, **kwargs)

    return bounded


def _environment() -> jinja2.Environment:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            if op == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                left, right = right, left
            if op == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)) \
                    and left * len(right) > MAX_ITEMS:
                _refuse(f"a repetition longer than {MAX_ITEMS}")
            if op == "**" and isinstance(left, int) and isinstance(right, int) \
                    and right * max(abs(left), 2).bit_length() > 4096:
                _refuse("a power larger than 4096 bits")
            return super().call_binop(context, op, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _check_ints(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation])

    def raise_exception(message: object) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def budget_range(*args: int) -> range:
        rng = range(*args)
        _spend(len(rng))
        return rng

    class TemplateDict:  # `dict(...)` without the type itself (no `dict.mro()` type-hackery)
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no `_private` names (transformers' rule)
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's signature trick
            attrs = dict(*args[1:], **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(args[0], attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env.filters.update({name: _bounded(f) for name, f in env.filters.items()})  # 'x'|center(10**9)
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, range=budget_range,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


def compile_template(source: object, where: str) -> jinja2.Template:
    """The compiled template; TokenizerError (naming ``where``) when it is not a string or has a syntax error."""
    import jinja2

    if not isinstance(source, str):
        raise TokenizerError("the chat template is not text", given=f"{where}: {type(source).__name__}",
                             expected="a Jinja template string")
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError("the chat template has a syntax error",
                             given=f"{where}, line {exc.lineno}: {_one_line(exc.message)}",
                             expected="a Jinja template as transformers renders it") from None
    except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
        raise TokenizerError("the chat template does not compile", given=f"{where}: {_one_line(exc)}",
                             expected="a Jinja template as transformers renders it") from None


def render(template: jinja2.Template, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render in the sandbox; a refused attribute, ``raise_exception`` or any failure is one TokenizerError."""
    import jinja2

    token = _budget.set([MAX_ITEMS])
    try:
        return template.render(messages=messages, **variables)
    except jinja2.exceptions.SecurityError as exc:
        raise TokenizerError("the chat template tried something the sandbox forbids",
                             given=_one_line(exc), expected="a template that only formats the messages",
                             hint="the folder's chat template may be hostile; do not use --chat with it") from None
    except jinja2.TemplateError as exc:  # raise_exception(...), an undefined name called, ...
        raise TokenizerError("the chat template refused the messages", given=_one_line(exc) or type(exc).__name__,
                             expected="messages the template accepts") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError,
            MemoryError) as exc:
        raise TokenizerError("the chat template failed", given=f"{type(exc).__name__}: {_one_line(exc)}",
                             expected="a template that renders these messages") from None
    finally:
        _budget.reset(token)

