"""How the `apertus` command's options mirror the Python API: an option's default is read from the signature (or
dataclass fields) of the function it is forwarded to, and parsed arguments are passed on by parameter name, so that
the command line and the Python API cannot drift apart."""

from __future__ import annotations

import dataclasses
import functools
import inspect


def defaults_of(target) -> dict:
    """The keyword defaults of a function or class (its signature), or of a dataclass (its fields)."""
    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target) if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(target).parameters.items() if p.default is not p.empty}


def add_options(parser, target, options: dict, **defaults) -> None:
    """`--name` for each option, its default taken from `target` unless given in `defaults` (a command's own)."""
    own = defaults_of(target)
    for name, kw in options.items():
        default = defaults.get(name, own[name])
        unset = default is None or default is False
        shown = "" if unset or "default" in kw.get("help", "") else " (default %(default)s)"
        parser.add_argument("--" + name.replace("_", "-"), default=default, **kw | {"help": kw.get("help", "") + shown})


def forward(fn, args, **given):
    """`fn` called with the parsed arguments named as its parameters, and `given` (which wins)."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in vars(args).items() if k in names} | given)


def picked(args, *groups: dict) -> dict:
    """The values of the options of `groups`, as keyword arguments for the callee."""
    return {name: getattr(args, name) for group in groups for name in group}


def printed(fn, text=None, status=None):
    """The handler of a command that is one call: `fn` with the parsed arguments (`forward`), its result printed as
    `text(result, ...)` (given the parsed arguments it names, too), exit status `status(result)` or 0."""

    def handler(args) -> int:
        result = forward(fn, args)
        print(result if text is None else forward(functools.partial(text, result), args))
        return status(result) if status else 0

    return handler


def csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None
