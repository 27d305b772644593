"""The words an error names a setting with: a check shared by the CLI and the Python API names the setting as a flag
(`--eps-warmup`); a caller of the API passed a keyword (`eps_warmup=`). The CLI speaks inside `speaking_flags()`;
outside it, `keyword_errors` rewrites the flags of the settings the call takes into their keywords (one home for the
translation, the checks stay one), and an unknown keyword's TypeError names the keyword the caller meant."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .errors import AdvtuneError

_FLAG_WORDS: contextvars.ContextVar[bool] = contextvars.ContextVar("advtune_speaking_flags", default=False)
FLAG = re.compile(r"(?<![\w/-])--([a-z][a-z0-9-]*)")  # a flag in a message (not a path's or a word's "--")


@contextlib.contextmanager
def speaking_flags() -> Iterator[None]:
    """Inside: errors name settings by their command-line flags (the CLI); outside: by their Python keywords."""
    token = _FLAG_WORDS.set(True)
    try:
        yield
    finally:
        _FLAG_WORDS.reset(token)


def in_keywords(error: AdvtuneError, names: Iterable[str], renamed: Mapping[str, str] | None = None) -> AdvtuneError:
    """`error`, its message rewritten in place (its type and traceback kept), with the flags of `names` written as the
    keywords they are (`--no-head`: `head=False`; `renamed`: flag name -> keyword where they differ); other flags
    (`--overwrite`) and the CLI's own errors as they were."""
    if _FLAG_WORDS.get() or not error.args or not isinstance(error.args[0], str):
        return error
    names, renamed = set(names), dict(renamed or {})

    def keyword(flag: re.Match) -> str:
        name = flag[1].replace("-", "_")
        if name in renamed:
            return renamed[name]
        if name.startswith("no_") and name[3:] in names:
            return f"{name[3:]}=False"
        return name if name in names else flag[0]

    error.args = (FLAG.sub(keyword, error.args[0]), *error.args[1:])
    return error


def keyword_errors(*names: str | type, **renamed: str) -> Callable:
    """Decorate an API function (or a settings dataclass's `__post_init__`) so that its errors name the keywords its
    caller passed: its own parameters, `names` (a dataclass: its fields), `renamed` (flag name -> keyword), and the
    fields of the dataclass whose method it is."""
    given = {f.name for n in names if isinstance(n, type) for f in dataclasses.fields(n)}
    given |= {n for n in names if isinstance(n, str)}

    def wrap(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        own = set(params) - {"self"}
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            unknown = [] if open_ended else [k for k in kwargs if k not in own]
            if unknown:  # Python's own TypeError, with the keyword the caller meant
                raise TypeError(unexpected_keyword(fn, unknown[0], own, names, renamed)) from None
            try:
                return fn(*args, **kwargs)
            except AdvtuneError as e:
                fields = (
                    {f.name for f in dataclasses.fields(args[0])}
                    if args and dataclasses.is_dataclass(args[0])
                    else set()
                )
                in_keywords(e, own | given | fields, renamed)
                raise

        return call

    return wrap


def unexpected_keyword(fn: Callable, key: str, own: set[str], names: tuple, renamed: Mapping[str, str]) -> str:
    """Python's message for an unknown keyword, and the keyword meant: a command flag's keyword name (`limit_test` ->
    `limit`), a field of a settings object the function takes (`params` -> `recipe=Recipe(params=...)`), a near
    spelling."""
    message = f"{fn.__name__}() got an unexpected keyword argument {key!r}"
    if key in renamed:
        return f"{message}; did you mean {renamed[key]}=...?"
    for kind in (n for n in names if isinstance(n, type)):
        if key in {f.name for f in dataclasses.fields(kind)}:
            holder = next((p for p, a in fn.__annotations__.items() if kind.__name__ in str(a)), None)
            if holder is not None and holder != key:
                return f"{message}; it is a {kind.__name__} setting: {holder}={kind.__name__}({key}=...)"
    close = difflib.get_close_matches(key, sorted(own), n=1)
    return f"{message}; did you mean {close[0]}=...?" if close else message
