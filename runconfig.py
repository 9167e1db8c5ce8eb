"""Typed run configuration shared by ``train_teacher.py`` and ``evaluate.py``: one dataclass whose
fields become command-line flags (with ``--help`` text), optionally preset by a YAML file."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from students.functional import LR_SCHEDULES


def field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line description that becomes its ``--help``."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class StudentTraining:
    """How every student trains in ``Teaching-v0``; shared by train_teacher.py and evaluate.py."""

    batch_size: int = field(128, "samples per student update")
    lr: float = field(0.1, "student learning rate")
    momentum: float = field(0.9, "student SGD momentum")
    weight_decay: float = field(5e-4, "student L2 weight decay")
    lr_schedule: str = field("constant", "student learning-rate schedule", choices=list(LR_SCHEDULES))
    eval_every: int = field(100, "updates between validation/test evaluations")
    val_size: int = field(1000, "clean validation samples carved from the training set")
    train_size: int | None = field(None, "keep at most this many training samples")

    def student_env_kwargs(self) -> dict[str, Any]:
        """These fields as keyword arguments of ``Teaching-v0``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(StudentTraining)}


def yaml_value(text: str) -> Any:
    """Parse a flag's value as YAML (for mappings and lists); a syntax error becomes an argparse error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r} ({e.__class__.__name__})") from e


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(converter, optional) for an annotation such as ``int``, ``float | None`` or ``bool``."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    return tp, optional


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls`` (all defaulting to None,
    so that flags given explicitly can override a ``--config`` file)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file presetting any of the fields below; flags win")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} (default: {f.default})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = f.metadata.get("parse", tp)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(cls: type, argv: list[str] | None, description: str) -> Any:
    """Parse ``argv`` into ``cls``: defaults, then the ``--config`` YAML, then explicit flags.
    Bad values and unknown YAML keys exit through ``parser.error`` (code 2, no traceback)."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        values = _read_yaml(parser, args.config, cls)
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        config = cls(**values)
        if hasattr(config, "validate"):
            config.validate()
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config


def _read_yaml(parser: argparse.ArgumentParser, path: Path, cls: type) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read --config {path}: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config {path} must hold a mapping of field: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        parser.error(f"--config {path} has unknown keys: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return data


def to_yaml(config: Any) -> str:
    """The config as YAML, loadable again with ``--config``."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
