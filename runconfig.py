"""Typed configuration shared by ``train_teacher.py``, ``evaluate.py`` and the teachers' options: one
dataclass per config whose fields become command-line flags (with ``--help`` text), optionally
preset by a YAML file, and one validation gate that checks every value's type, range and finiteness.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

import yaml

from students.data import DATASETS
from students.functional import LR_SCHEDULES
from students.models import STUDENTS
from students.noise import NOISE_TYPES


def field(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a one-line description that becomes its ``--help``. ``checks``:
    ``choices``, ``low`` / ``high`` (inclusive bounds), ``above`` / ``below`` (exclusive bounds), ``parse``
    (converter of the flag's text), ``default_text`` (what ``--help`` shows as the default, where the
    default value itself, e.g. None, would not say it)."""
    return dataclasses.field(default=default, metadata={"help": help, **checks})


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(type, optional) for an annotation such as ``int``, ``float | None`` or ``bool``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(name: str, value: Any, annotation: Any, meta: dict[str, Any]) -> Any:
    """``value`` checked against the field's annotation and checks, converted the way a user means
    it (``"3e-4"`` from YAML is a float, ``2`` is a float where a float is expected); a ValueError
    that names the field, the value and what is expected otherwise."""
    tp, optional = _flag_type(annotation)
    if tp is Any:  # checked by its own validation (e.g. a settings grid)
        return value
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be given (got null)")
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            raise ValueError(f"{name} must be finite, got an integer of {len(str(abs(value)))} digits") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    elif tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
    elif tp is dict and not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping such as '{{key: value}}', got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    check_range(name, value, meta)
    return value


def check_range(name: str, value: Any, meta: dict[str, Any]) -> None:
    """Refuse ``value`` outside the field's bounds, naming them as an interval ("in [0, 1)") or one side
    (">= 1")."""
    lower = f"[{meta['low']}" if "low" in meta else f"({meta['above']}" if "above" in meta else None
    upper = f"{meta['high']}]" if "high" in meta else f"{meta['below']})" if "below" in meta else None
    inside = (
        ("low" not in meta or value >= meta["low"]) and ("above" not in meta or value > meta["above"])
        and ("high" not in meta or value <= meta["high"]) and ("below" not in meta or value < meta["below"])
    )  # fmt: skip
    if inside:
        return
    if lower and upper:
        expected = f"in {lower}, {upper}"
    elif lower:
        expected = (">= " if lower[0] == "[" else "> ") + lower[1:]
    else:
        expected = ("<= " if upper[-1] == "]" else "< ") + upper[:-1]
    raise ValueError(f"{name} must be {expected}, got {value}")


def check_fields(config: Any, as_flags: bool = False) -> Any:
    """Coerce and check every field of the dataclass instance ``config`` in place; returns it.
    Messages name fields as ``--flag-name`` with ``as_flags``, else as they are spelled."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        name = "--" + f.name.replace("_", "-") if as_flags else f.name
        setattr(config, f.name, coerce(name, getattr(config, f.name), hints[f.name], f.metadata))
    return config


@dataclasses.dataclass
class EnvSetting:
    """Which student learns what, under which noise: the ``Teaching-v0`` setting both CLIs share."""

    dataset: str = field("mnist1d", "dataset the student learns", choices=list(DATASETS))
    student: str = field("mlp", "student network", choices=list(STUDENTS))
    student_kwargs: dict | None = field(None, "student constructor arguments as YAML, e.g. '{hidden: [64, 32]}'")
    noise: str = field("symmetric", "label noise of the training split", choices=list(NOISE_TYPES))
    noise_rate: float = field(0.4, "fraction of training labels corrupted, in [0, 1)", low=0, below=1)
    seed: int = field(0, "seeds data split, label noise, student, teacher and batch order", low=0)
    device: str = field("auto", "auto (CUDA when available), cpu or cuda", choices=["auto", "cpu", "cuda"])
    data_root: str | None = field(
        None,
        "folder holding torchvision-style datasets (e.g. ../shared/data)",
        default_text="./data, from where the command runs",
    )
    download: bool = field(False, "let torchvision download a missing dataset")


@dataclasses.dataclass
class StudentTraining:
    """How every student trains in ``Teaching-v0``; shared by train_teacher.py and evaluate.py."""

    batch_size: int = field(128, "samples per student update", low=1)
    lr: float = field(0.1, "student learning rate", above=0.0)
    momentum: float = field(0.9, "student SGD momentum", low=0, below=1)
    weight_decay: float = field(5e-4, "student L2 weight decay", low=0.0)
    lr_schedule: str = field("constant", "student learning-rate schedule", choices=list(LR_SCHEDULES))
    eval_every: int = field(100, "updates between validation/test evaluations", low=1)
    val_size: float | None = field(
        None,
        "clean validation split carved from the training set: a count, or a fraction if < 1",
        above=0.0,
        default_text="10% of the training set, at most 1000",
    )
    train_size: int | None = field(None, "keep at most this many training samples", low=1)
    select_fraction: float = field(
        0.5,
        "share of the clean split held out for selection and tuning only (no method trains or meta-learns on it)",
        low=0,
        below=1,
    )

    def student_env_kwargs(self) -> dict[str, Any]:
        """These fields as keyword arguments of ``Teaching-v0``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(StudentTraining)}


GRID_KEYS = ("dataset", "student", "noise", "noise_rate")


def settings_grid(base: EnvSetting, grid: dict | list | None) -> list[dict[str, Any]]:
    """The env settings of a grid: the product of ``grid``'s axes (``GRID_KEYS``; axes it leaves out
    keep ``base``'s value; ``student_kwargs`` may map student -> kwargs), or, for a list, its
    settings one by one (keys they leave out keep ``base``'s value); each checked by name."""
    if isinstance(grid, list):
        return [setting for item in grid for setting in settings_grid(base, _as_axes(item, base))]
    grid = grid or {}
    unknown = sorted(set(grid) - set(GRID_KEYS) - {"student_kwargs"})
    if unknown:
        raise ValueError(f"grid: unknown keys {', '.join(unknown)}; valid: {', '.join(GRID_KEYS)}, student_kwargs")
    axes = {k: grid.get(k, [getattr(base, k)]) for k in GRID_KEYS}
    bad = [k for k, v in axes.items() if not isinstance(v, list)]
    if bad:
        raise ValueError(f"grid: {', '.join(bad)} must be a list of values, got {', '.join(repr(axes[k]) for k in bad)}")
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise ValueError(f"the grid is empty: no values for {', '.join(empty)}")
    per_student = grid.get("student_kwargs") or {}
    if not isinstance(per_student, dict):
        raise ValueError(f"grid student_kwargs must map student -> {{argument: value}}, got {per_student!r}")
    settings = [
        {"dataset": d, "student": s, "noise": n, "noise_rate": r, "student_kwargs": per_student.get(s, base.student_kwargs)}
        for d, s, n, r in itertools.product(*(axes[k] for k in GRID_KEYS))
    ]
    meta = {f.name: f.metadata for f in dataclasses.fields(EnvSetting)}
    for setting in settings:
        for key in GRID_KEYS:
            setting[key] = coerce(f"grid {key}", setting[key], float if key == "noise_rate" else str, meta[key])
        if setting["student_kwargs"] is not None and not isinstance(setting["student_kwargs"], dict):
            raise ValueError(f"grid student_kwargs must map student -> {{argument: value}}, got {setting['student_kwargs']!r}")
    return settings


def _as_axes(setting: Any, base: EnvSetting) -> dict[str, Any]:
    """One explicit setting of a grid list as one-value axes."""
    if not isinstance(setting, dict):
        raise ValueError(f"grid: a list of settings must hold mappings such as '{{dataset: digits}}', got {setting!r}")
    lists = [k for k, v in setting.items() if k != "student_kwargs" and isinstance(v, (list, dict))]
    if lists:  # each entry is one setting; several values go in a grid mapping instead
        raise ValueError(f"grid: a setting of a list takes one value per key; {', '.join(lists)} of {setting!r} is not one")
    axes = {k: [v] for k, v in setting.items() if k != "student_kwargs"}
    if "student_kwargs" in setting:
        axes["student_kwargs"] = {setting.get("student", base.student): setting["student_kwargs"]}
    return axes


def setting_label(setting: dict[str, Any]) -> str:
    """``dataset/student/noise rate`` of a setting (or a run's row)."""
    return f"{setting['dataset']}/{setting['student']}/{setting['noise']} {setting['noise_rate']}"


# what yaml.safe_load raises on text it cannot load: its own errors, and ValueError for an integer of more
# digits than Python converts
YAML_ERRORS = (yaml.YAMLError, ValueError)


def yaml_value(text: str) -> Any:
    """Parse a flag's value as YAML (for mappings and lists); a syntax error becomes an argparse error."""
    try:
        return yaml.safe_load(text)
    except YAML_ERRORS as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r} ({e.__class__.__name__})") from e


def _flag_parser(tp: Any, meta: dict[str, Any]) -> Any:
    """What turns a flag's text into a value: YAML for mappings, the type itself otherwise."""
    if "parse" in meta:
        return meta["parse"]
    return yaml_value if tp is dict else tp


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def exit_on_bad_input(prog: str, message: str) -> NoReturn:
    """The commands' answer to bad input: one line on stderr, ``prog: error: ...``, exit code 2, no traceback.
    Messages that quote another library's (YAML's caret diagrams, torch's coloured multi-line errors) are
    folded onto the line."""
    print(f"{prog}: error: {' '.join(ANSI_ESCAPE.sub('', message).split())}", file=sys.stderr)
    sys.exit(2)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose bad input gets ``exit_on_bad_input``'s one line (argparse's own puts the whole usage
    block first; ``--help`` shows it)."""

    def error(self, message: str) -> NoReturn:
        exit_on_bad_input(self.prog, message)


class ConfigFileAction(argparse.Action):
    """Stores the YAML file's path and the flag that named it, for messages about the file."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, flag: str | None = None
    ) -> None:
        setattr(namespace, self.dest, value)
        namespace.config_flag = flag


def build_parser(cls: type, description: str, config_flags: tuple[str, ...] = ("--config",)) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls`` (all defaulting to None,
    so that flags given explicitly can override a ``--config`` file, given by any of ``config_flags``)."""
    parser = OneLineErrorParser(description=description, allow_abbrev=False)
    parser.add_argument(
        *config_flags,
        dest="config",
        type=Path,
        default=None,
        action=ConfigFileAction,
        help="YAML file presetting any of the fields below; flags win",
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _flag_type(hints[f.name])
        default = f.metadata.get("default_text", f.default)
        text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _flag_parser(tp, f.metadata)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def parse_config(cls: type, argv: list[str] | None, description: str, config_flags: tuple[str, ...] = ("--config",)) -> Any:
    """Parse ``argv`` into ``cls``: defaults, then the ``--config`` YAML, then explicit flags; every
    value goes through ``check_fields`` and the class's ``validate``. Bad values and unknown YAML
    keys exit through ``parser.error`` (code 2, one line, no traceback)."""
    parser = build_parser(cls, description, config_flags)
    values = explicit_values(parser, cls, argv)
    try:
        config = check_fields(cls(**values), as_flags=True)
        if hasattr(config, "validate"):
            config.validate()
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config


def explicit_values(parser: argparse.ArgumentParser, cls: type, argv: list[str] | None) -> dict[str, Any]:
    """The values a command line sets: its ``--config`` YAML, overridden by its explicit flags
    (defaults left out)."""
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        values = read_yaml_config(parser, args.config, cls, args.config_flag)
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "config_flag") and v is not None})
    return values


def read_yaml_config(parser: argparse.ArgumentParser, path: Path, cls: type, flag: str = "--config") -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (given by ``flag``, which messages name); unreadable files and
    unknown keys exit via ``parser.error``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, *YAML_ERRORS) as e:
        parser.error(f"cannot read {flag} {path}: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"{flag} {path} must hold a mapping of field: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        parser.error(f"{flag} {path} has unknown keys: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return data


def to_yaml(config: Any) -> str:
    """The config as YAML, loadable again with ``--config``."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
