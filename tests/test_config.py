"""Configuration on pydantic (harness/core/config.py): every option is declared once, and that one
declaration validates --set/YAML values, documents the option and carries its search range."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import optuna
import pytest

import methods  # noqa: F401  (registers every method)
import scenarios  # noqa: F401
from harness.core.config import Search, check, documented, hparams_from, role_value, schema
from harness.core.defaults import rows, undocumented
from harness.core.errors import UserError
from harness.core.method import METHODS, HParams
from harness.core.protocol import Protocol
from scenarios.base import SCENARIOS

ALL_CLASSES = sorted({m.HParams for m in METHODS.values()} | {s.options for s in SCENARIOS.values()} | {Protocol},
                     key=lambda c: c.__qualname__)


@dataclass
class Toy(HParams):
    strength: float = documented(1.0, "a weight", "ours", ge=0, search=Search.log(0.1, 10.0, order=2))
    kind: str = documented("a", "a | b", "ours", choices=("a", "b"), search=Search.categorical("a", "b", order=1))
    count: int = documented(3, "a count", "ours", ge=1, le=9)
    share: float = documented(0.5, "a share", "ours", gt=0, lt=1)
    flag: bool = documented(False, "a switch", "ours")
    name: str | None = documented(None, "an optional name", "ours")
    cap: float | None = documented(None, "an optional bound", "ours", gt=0)
    size: int = documented(10, "a buffer", "ours", role="buffer_size")


def test_values_from_the_command_line_are_converted_to_the_field_types():
    hp = hparams_from(Toy, {"strength": "2", "kind": "b", "count": "4", "share": 0.25, "flag": "yes",
                            "name": 5, "cap": "none"})
    assert (hp.strength, hp.kind, hp.count, hp.share, hp.flag, hp.name, hp.cap) == (2.0, "b", 4, 0.25, True, "5", None)
    assert type(hp.strength) is float and type(hp.count) is int
    assert hparams_from(Toy, {"count": 4.0}).count == 4  # a whole float is an int
    assert hparams_from(Toy, {"name": "None"}).name is None
    assert hparams_from(Toy, {}) == Toy()  # defaults untouched


@pytest.mark.parametrize(("values", "line"), [
    ({"strength": -1}, "error: strength must be >= 0, got -1 — set strength >= 0, e.g. the default strength=1.0"),
    ({"count": 0}, "error: count must be >= 1, got 0 — set count >= 1, e.g. the default count=3"),
    ({"count": 10}, "error: count must be <= 9, got 10 — set count <= 9, e.g. the default count=3"),
    ({"share": 1.0}, "error: share must be < 1, got 1.0 — set share < 1, e.g. the default share=0.5"),
    ({"share": 0}, "error: share must be > 0, got 0 — set share > 0, e.g. the default share=0.5"),
    ({"cap": 0}, "error: cap must be > 0, got 0 — set cap > 0, e.g. the default cap=None"),
    ({"kind": "c"}, "error: kind='c' is not one of a, b — set kind to one of ['a', 'b']"),
    ({"strength": "nan"}, "error: option strength='nan' is not a finite number — give strength a finite value"),
    ({"strength": "inf"}, "error: option strength='inf' is not a finite number — give strength a finite value"),
    ({"strength": True}, "error: option strength=True is not a valid float — give strength a float value"),
    ({"count": True}, "error: option count=True is not a valid int — give count an int value"),
    ({"count": 2.5}, "error: option count=2.5 is not a valid int — give count an int value"),
    ({"count": "many"}, "error: option count='many' is not a valid int — give count an int value"),
    ({"flag": "maybe"}, "error: option flag='maybe' is not a valid bool — give flag a bool value"),
    ({"bogus": 1}, ("error: unknown option 'bogus' for Toy — valid options: cap, count, flag, kind, name, share, "
                    "size, strength")),
])
def test_bad_values_are_one_line_naming_the_field_and_the_fix(values, line):
    with pytest.raises(UserError) as e:
        hparams_from(Toy, values)
    assert e.value.line() == line
    assert "\n" not in e.value.line()


def test_check_validates_a_built_configuration_too():
    check(Toy())
    with pytest.raises(UserError, match="count must be >= 1"):
        check(dataclasses.replace(Toy(), count=0))
    with pytest.raises(UserError, match="lr must be > 0"):
        dataclasses.replace(Protocol(), lr=-1.0).validate()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__qualname__)
def test_every_configuration_has_a_schema_its_defaults_pass_and_string_values_round_trip(cls):
    """Every registered method's hyperparameters, scenario's options and the protocol: the defaults
    pass their own declaration, and each field set from its default written as text (what --set
    gives) comes back as the default."""
    model = schema(cls)
    assert set(model.model_fields) == {f.name for f in dataclasses.fields(cls)}
    check(cls())
    for f in dataclasses.fields(cls):
        if isinstance(f.default, (bool, int, float, str)) and not isinstance(f.default, list):
            text = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            if f.default == "":
                continue
            assert getattr(hparams_from(cls, {f.name: text}), f.name) == getattr(cls(), f.name), (cls, f.name)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__qualname__)
def test_every_option_is_documented_with_meaning_and_source(cls):
    assert undocumented(cls) == []


def test_choices_and_bounds_show_in_the_tables():
    table = {r["name"]: r for r in rows(Toy)}
    assert table["kind"]["accepts"] == "a | b"
    assert table["count"]["accepts"] == ">= 1, <= 9"
    assert table["strength"]["search"] == "log-uniform [0.1, 10]"
    assert table["kind"]["search"] == "{'a', 'b'}"
    out = subprocess.run([sys.executable, "-m", "harness.cli", "list", "--scenario", "permuted-fmnist", "--protocol"],
                         capture_output=True, text=True, check=True).stdout
    assert "| `normalization` | `'fmnist'` | fmnist \\| mnist \\| none |" in out
    assert "| `lr` | `0.01` | > 0 | log-uniform [0.001, 0.1] |" in out


def test_search_ranges_beside_the_fields_suggest_in_their_order():
    class ToyMethod(METHODS["ft"]):
        HParams = Toy

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space = ToyMethod.search_space(trial)
    assert list(space) == ["protocol.lr", "kind", "strength"]
    assert list(trial.params) == ["lr", "kind", "strength"]  # the order the sampler drew them in
    assert 1e-3 <= space["protocol.lr"] <= 1e-1 and 0.1 <= space["strength"] <= 10.0


# The hand-written search spaces the fields replaced (as they were at e1ee6bb), to show the tuned
# studies replay: the same parameters, distributions and order, hence the same draws.
def _old_spaces(name, trial):
    lr = {"protocol.lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True)}
    if name == "ewc":
        return {**lr, "ewc_lambda": trial.suggest_float("ewc_lambda", 1.0, 1e6, log=True)}
    if name == "lwf":
        return {**lr, "alpha": trial.suggest_float("alpha", 0.1, 10.0, log=True),
                "temperature": trial.suggest_categorical("temperature", [1.0, 2.0, 4.0])}
    if name == "m2mkd":
        return {**lr, "alpha": trial.suggest_float("alpha", 0.1, 0.9),
                "temperature": trial.suggest_categorical("temperature", [1.0, 2.0, 4.0])}
    if name == "si":
        return {**lr, "c": trial.suggest_float("c", 1e-3, 1e3, log=True),
                "xi": trial.suggest_float("xi", 1e-3, 1.0, log=True)}
    return lr


@pytest.mark.parametrize("name", ["ft", "joint", "ewc", "lwf", "si", "er", "m2mkd", "fedavg", "dimat", "wa"])
def test_the_search_spaces_from_the_fields_equal_the_old_hand_written_ones(name):
    draws = []
    for space in (lambda t: _old_spaces(name, t), METHODS[name].search_space):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=2))
        got = []
        for _ in range(4):
            trial = study.ask()
            params = space(trial)
            got.append(list(params.items()))
            study.tell(trial, sum(float(v) for v in params.values()))
        draws.append(got)
    assert draws[0] == draws[1]


def test_the_buffer_size_is_the_field_declared_with_the_role():
    assert role_value(Toy(size=7), "buffer_size") == 7
    assert role_value(METHODS["er"].HParams(buffer_size=200), "buffer_size") == 200
    assert role_value(METHODS["ft"].HParams(), "buffer_size") is None
    if "avl-replay" in METHODS:
        assert role_value(METHODS["avl-replay"].HParams(mem_size=300), "buffer_size") == 300
