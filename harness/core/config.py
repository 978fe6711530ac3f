"""Configuration: every option is a dataclass field declared once, validated by pydantic.

A field is declared with :func:`documented`: its default, what it means, where the value comes from,
and what it accepts (``ge``/``gt``/``le``/``lt`` bounds, ``choices``), plus, where the method is
tuned, its Optuna search range (``search``). That one declaration feeds everything:

- ``--set``, YAML (suites, ablations, tuned files) and the Python API: :func:`hparams_from` validates
  values with a pydantic model derived from the fields (:func:`schema`): the field's type, bounds and
  choices, finite floats, no unknown keys. A failure is one ``UserError`` line (exit status 2).
- ``dmkd list --method NAME`` / ``--scenario NAME`` / ``--protocol`` and docs/defaults.md
  (:mod:`harness.cli.defaults`) print the same metadata; a test keeps the file equal to it.
- MLflow params and run records carry the field names and values (``dataclasses.asdict``).
- :meth:`harness.core.method.Method.search_space` suggests every field that has a ``search`` range.

Rules between fields (``top_k <= n_experts``) stay in the dataclass's ``validate()``, which
:func:`hparams_from` calls after pydantic has checked every field.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from harness.core.errors import UserError

BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


# ---------------------------------------------------------------------------------------------
# Declaring a field
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Search:
    """The Optuna search range of a tuned field (``documented(..., search=Search.log(1, 1e6))``)."""

    kind: str  # float | log | int | categorical
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    # Position of this suggestion within a trial (ties: declaration order). The sampler's random
    # stream depends on the order of suggestions, so a method keeps the order its studies ran with.
    order: int = 0

    @classmethod
    def log(cls, low: float, high: float, order: int = 0) -> Search:
        return cls("log", low, high, order=order)

    @classmethod
    def uniform(cls, low: float, high: float, order: int = 0) -> Search:
        return cls("float", low, high, order=order)

    @classmethod
    def integers(cls, low: int, high: int, order: int = 0) -> Search:
        return cls("int", low, high, order=order)

    @classmethod
    def categorical(cls, *choices: Any, order: int = 0) -> Search:
        return cls("categorical", choices=tuple(choices), order=order)

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high))
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "log")

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(repr, self.choices)) + "}"
        scale = {"log": "log-uniform", "float": "uniform", "int": "integers"}[self.kind]
        return f"{scale} [{self.low:g}, {self.high:g}]"


def documented(
    default: Any, meaning: str, source: str, *, ge: float | None = None, gt: float | None = None,
    le: float | None = None, lt: float | None = None, choices: Sequence[Any] | None = None,
    search: Search | None = None, role: str | None = None,
) -> Any:
    """A dataclass field with its default, meaning, source (paper/code and the setting it was chosen
    for, or "ours" with the reason), the values it accepts and, where tuned, its search range.
    ``role`` names what the harness reads the field as (``"buffer_size"``: the report's buffer column)."""
    metadata: dict[str, Any] = {"meaning": meaning, "source": source}
    for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if value is not None:
            metadata[key] = value
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if search is not None:
        metadata["search"] = search
    if role is not None:
        metadata["role"] = role
    return dataclasses.field(default=default, metadata=metadata)


def accepts(f: dataclasses.Field) -> str:
    """What a field accepts, in words, from its metadata ('' when only its type constrains it)."""
    md = f.metadata
    if md.get("choices"):
        return " | ".join(map(str, md["choices"]))
    parts = [f"{op} {md[k]:g}" for k, op in BOUNDS.items() if md.get(k) is not None]
    return ", ".join(parts)


def fields_with(cls: type, key: str) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` whose metadata has ``key`` (in declaration order)."""
    return [f for f in dataclasses.fields(cls) if key in f.metadata]


def role_value(obj: Any, role: str) -> Any:
    """The value of the field of configuration ``obj`` declared with ``role=role`` (None if none)."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("role") == role:
            return getattr(obj, f.name)
    return None


def suggest_fields(cls: type, trial: Any, cap: Any = None) -> dict[str, Any]:
    """One Optuna suggestion per field of ``cls`` with a ``search`` range, in their ``order``.

    ``cap(name, suggested) -> int | None``, for an integer field declared ``role="capacity"``, gives
    the largest value that fits a budget given the values suggested so far: the field is suggested
    inside ``[low, min(high, cap)]`` (a constraint on the suggestion, not a filter on its result)."""
    tuned = sorted(fields_with(cls, "search"), key=lambda f: f.metadata["search"].order)
    out: dict[str, Any] = {}
    for f in tuned:
        search = f.metadata["search"]
        if cap is not None and f.metadata.get("role") == "capacity" and search.kind == "int":
            limit = cap(f.name, dict(out))
            if limit is not None:
                search = dataclasses.replace(search, high=min(int(search.high), int(limit)))
        out[f.name] = search.suggest(trial, f.name)
    return out


# ---------------------------------------------------------------------------------------------
# Validation (pydantic)
# ---------------------------------------------------------------------------------------------
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True,
                     protected_namespaces=(), arbitrary_types_allowed=True)
_NONE_WORDS = ("none", "None", "null", "")


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic's lax mode would read True as 1
        raise PydanticCustomError("bool_as_number", "a boolean is not a number")
    return value


def _none_word(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip() in _NONE_WORDS else value


def _annotation(typ: Any, f: dataclasses.Field) -> Any:
    """The pydantic annotation of one field: its type, choices as a Literal, bounds as Field(...)."""
    args = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union else ()
    optional = type(None) in args
    base = [a for a in args if a is not type(None)] if args else [typ]
    md = f.metadata
    if md.get("choices"):
        inner: Any = Literal[tuple(md["choices"])]
    elif len(base) == 1:
        inner = base[0]
    else:
        inner = typing.Union[tuple(base)]  # noqa: UP007 (built from a runtime tuple)
    if inner in (int, float):
        inner = Annotated[inner, BeforeValidator(_no_bool)]
    bounds = {k: md[k] for k in BOUNDS if md.get(k) is not None}
    if bounds:
        inner = Annotated[inner, Field(**bounds)]
    if optional:
        return Annotated[inner | None, BeforeValidator(_none_word)]
    return inner


@functools.cache
def schema(cls: type) -> type[pydantic.BaseModel]:
    """The pydantic model of a configuration dataclass, derived from its fields (cached)."""
    hints = typing.get_type_hints(cls)
    defs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = Field(default=f.default, description=f.metadata.get("meaning"))
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory, description=f.metadata.get("meaning"))
        else:
            default = Field(description=f.metadata.get("meaning"))
        defs[f.name] = (_annotation(hints[f.name], f), default)
    return pydantic.create_model(f"{cls.__name__}Schema", __config__=_CONFIG, __doc__=cls.__doc__, **defs)


def hparams_from(cls: type, overrides: dict[str, Any]) -> Any:
    """An instance of configuration dataclass ``cls`` from CLI/YAML values: pydantic converts each
    value to its field's type and checks its bounds and choices, then ``validate()`` checks the rules
    between fields. Every problem is one UserError."""
    hp = cls(**_validated(cls, overrides))
    validate = getattr(hp, "validate", None)
    if callable(validate):
        validate()
    return hp


def check(obj: Any) -> None:
    """Check every field of an already built configuration against its declaration (defaults and
    values set by ``dataclasses.replace`` too); the rules between fields are ``validate()``'s."""
    _validated(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init})


def _validated(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` converted and checked by the pydantic model of ``cls`` (one UserError if not)."""
    try:
        checked = schema(cls).model_validate(dict(values))
    except pydantic.ValidationError as e:
        raise _user_error(cls, e) from None
    return {k: getattr(checked, k) for k in values}


def _type_name(cls: type, key: str) -> str:
    typ = typing.get_type_hints(cls).get(key)
    name = getattr(typ, "__name__", None) if not isinstance(typ, types.UnionType) else None
    return name or str(typ).replace("typing.", "")


def _user_error(cls: type, e: pydantic.ValidationError) -> UserError:
    """The first pydantic error as the harness's one line: the problem and how to fix it."""
    err = e.errors(include_url=False)[0]
    key = str(err["loc"][0]) if err["loc"] else ""
    value = err.get("input")
    kind = err["type"]
    ctx = err.get("ctx") or {}
    names = [f.name for f in dataclasses.fields(cls)]
    if kind == "extra_forbidden":
        return UserError(f"unknown option {key!r} for {cls.__qualname__}", f"valid options: {', '.join(sorted(names)) or '(none)'}")
    f = next(x for x in dataclasses.fields(cls) if x.name == key)
    default = f.default if f.default is not dataclasses.MISSING else None
    if kind == "finite_number":
        return UserError(f"option {key}={value!r} is not a finite number", f"give {key} a finite value")
    for bound, op in BOUNDS.items():
        if kind == {"ge": "greater_than_equal", "gt": "greater_than", "le": "less_than_equal", "lt": "less_than"}[bound]:
            limit = ctx.get(bound)
            return UserError(f"{key} must be {op} {limit:g}, got {value!r}",
                             f"set {key} {op} {limit:g}, e.g. the default {key}={default!r}")
    if kind == "literal_error":
        allowed = f.metadata["choices"]
        return UserError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}",
                         f"set {key} to one of {list(allowed)}")
    tname = _type_name(cls, key)
    if kind.endswith(("_parsing", "_type", "_from_float", "bool_as_number")) or kind == "union_tag_invalid":
        return UserError(f"option {key}={value!r} is not a valid {tname}", f"give {key} {_article(tname)} {tname} value")
    return UserError(f"option {key}={value!r}: {err['msg']}", f"give {key} a valid {tname} value")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate ``protocol.<field>`` entries from method hyperparameters."""
    method = {k: v for k, v in params.items() if not k.startswith("protocol.")}
    protocol = {k[len("protocol."):]: v for k, v in params.items() if k.startswith("protocol.")}
    return method, protocol


def require(cond: bool, problem: str, fix: str) -> None:
    """A rule between fields, in a configuration dataclass's ``validate()``."""
    if not cond:
        raise UserError(problem, fix)


def choice(value: str, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is not one of {', '.join(allowed)}", f"set {key} to one of {list(allowed)}")


# ---------------------------------------------------------------------------------------------
# Files (suites, ablation grids, tuned settings): pydantic models of their structure
# ---------------------------------------------------------------------------------------------
class Document(pydantic.BaseModel):
    """Base of the model of a YAML file's structure: unknown keys refused, no type coercion (a
    ``data_root: 5`` is an error, not the folder "5"). The values inside (hyperparameters, options,
    protocol) are checked against their own dataclasses afterwards."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


def validate_document(model: type[Document], raw: Any, where: str, example: str) -> Any:
    """``raw`` (a parsed YAML document) as ``model``, or one UserError naming the file, the key and the fix."""
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a YAML mapping", example)
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as e:
        raise _document_error(model, e, where, example) from None


def _document_error(model: type[Document], e: pydantic.ValidationError, where: str, example: str) -> UserError:
    err = e.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    key = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
    leaf = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        inside = key.rsplit(".", 1)[0] if len(loc) > 1 else ""
        valid = ", ".join(sorted(parent.model_fields)) if parent is not None else ""
        return UserError(f"{where}: unknown key(s) {loc[-1]}" + (f" in {inside}" if inside else ""),
                         f"valid keys: {valid}")
    if kind == "missing":
        return UserError(f"{where}: {key} is missing", example)
    if kind == "string_type":
        return UserError(f"{where}: {key} must be a string, got {value!r}", f"write {leaf}: as text, e.g. {leaf}: \"...\"")
    if kind == "model_type" and isinstance(loc[-1], int):
        return UserError(f"{where}: {key} must be a name or a mapping with name:, got {value!r}", example)
    if kind in ("dict_type", "model_type"):
        return UserError(f"{where}: {key} must be a mapping, got {value!r}", example)
    if kind in ("list_type", "too_short"):
        return UserError(f"{where}: {key} must be a non-empty list", f"add a {leaf}: list ({example})")
    return UserError(f"{where}: {key}: {err['msg']}", example)


def _model_at(model: type[pydantic.BaseModel], loc: tuple) -> type[pydantic.BaseModel] | None:
    """The model class that holds location ``loc`` of a document (following fields, lists, dicts)."""
    current: Any = model
    for part in loc:
        if not isinstance(part, str):
            continue  # a list index or dict key: the item type is found below
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        current = _inner_model(fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, pydantic.BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
