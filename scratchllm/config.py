"""Configs for any recipe: dataclass sections, TOML files, and `--section.key=value` overrides.

A recipe's config is a dataclass (subclassing `Sections`) whose fields are its sections: each
a dataclass of typed keys, or a dict whose allowed keys are listed in the field's metadata
(`field(metadata={"keys": [...]})`, e.g. [model], which takes any GPTConfig field). The same
loader serves every recipe: unknown sections and keys are errors naming the nearest one, values
are coerced to the annotated type, and each section's `check()` (if it has one) validates it.
"""

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from scratchllm.errors import UserError
from scratchllm.fileio import read_utf8

C = TypeVar("C")


class Sections:
    """Base of a recipe config: to_dict() and to_toml() of all its sections."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_toml(self) -> str:
        """The resolved config as TOML (what the run directory keeps)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()
                      if value is not None]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str | Path | None, overrides: Sequence[str], schema: type[C]) -> C:
    """Read a TOML config into `schema` (its defaults when path is None), apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        text = read_utf8(path, "give a TOML config file (presets are in configs/)")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path} is not valid TOML: {e}") from None
    config = schema()
    sections = {f.name: f for f in fields(schema)}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"{path}: top-level key {section!r} must be a [section]"
                            f"{_suggest(section, list(sections))}")
        for key, value in values.items():
            _set(config, sections, section, key, value, f"{path}: ")
    for override in overrides:
        section, key, value = _parse_override(override)
        _set(config, sections, section, key, value, "")
    # Every section's check(), then the whole config's (cross-section rules), before any work.
    for target in [*(getattr(config, name) for name in sections), config]:
        check = getattr(target, "check", None)
        if check is not None:
            check()
    return config


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """A UserError naming the nearest valid choice unless value is one of choices."""
    if value not in choices:
        raise UserError(f"{name} = {value!r} is not one of {', '.join(choices)}"
                        f"{_suggest(value, list(choices))}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """A UserError unless low <= value <= high (low < value with low_open)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                  f"<= {high}" if high is not None else ""]
        raise UserError(f"{name} = {value} is out of range: it must be "
                        f"{' and '.join(b for b in bounds if b)}")


def _parse_override(text: str) -> tuple[str, str, Any]:
    """'--train.max_steps=100' -> ('train', 'max_steps', 100); values are read as TOML."""
    body = text[2:] if text.startswith("--") else text
    name, sep, raw = body.partition("=")
    if not sep or "." not in name:
        raise UserError(f"cannot read override {text!r}: write --section.key=value, "
                        "e.g. --train.max_steps=100")
    section, key = name.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --data.source=gutenberg
    return section, key.replace("-", "_"), value


def _set(config: Any, sections: dict, section: str, key: str, value: Any, where: str) -> None:
    if section not in sections:
        raise UserError(f"{where}unknown config section [{section}]"
                        f"{_suggest(section, list(sections))}; sections: {', '.join(sections)}")
    target = getattr(config, section)
    if isinstance(target, dict):  # a free-form section: its keys are listed in the metadata
        allowed = list(sections[section].metadata.get("keys", ()))
        if key not in allowed:
            raise UserError(f"{where}unknown key {section}.{key}{_suggest(key, allowed)}")
        target[key] = value
        return
    names = {f.name: f for f in fields(target)}
    if key not in names:
        raise UserError(f"{where}unknown key {section}.{key}{_suggest(key, list(names))}")
    setattr(target, key, _coerce(value, names[key].type, f"{section}.{key}", where))


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _coerce(value: Any, annotation: Any, name: str, where: str) -> Any:
    if typing.get_origin(annotation) is list or annotation in ("list[str]", list):
        # a TOML list of strings, or `--section.key=a,b` on the command line
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise UserError(f"{where}{name} must be a list of strings, got {value!r}")
        return [v for v in items if v]
    kind = annotation if isinstance(annotation, type) else _resolve(annotation)
    if kind is bool and isinstance(value, str) and value.lower() in _BOOLS:
        return _BOOLS[value.lower()]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and not isinstance(value, str):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}{name} must be {kind.__name__}, got {value!r}")
    return value


def _resolve(annotation: Any) -> type:
    if isinstance(annotation, str):
        return {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation
