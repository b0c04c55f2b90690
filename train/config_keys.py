"""The config keys as a reference: each field's type, default and docstring, read from the schema itself.

`make keys` prints key_reference() (docs/config.md is that print, and a test keeps the two equal); the
loader's "did you mean" asks closest_key, which matches a mistyped key by name and by what the keys'
docstrings say (`train.learning_rate` -> `train.lr`, `train.wandb` -> `train.sinks`).

    python -m train.config_keys [--output PATH]
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

from env.common.atomic import write_text_atomically
from env.common.cli import ArgumentParser, run_cli
from train.config import DataConfig, ModelConfig, RunConfig, TrainConfig, resume_fixed_keys
from train.models import registered


@functools.cache
def field_types(section_class: type) -> dict[str, Any]:
    """Each field's resolved type (resolving the annotations is the slow part of setting a key)."""
    hints = typing.get_type_hints(section_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_class)}


@functools.cache
def field_docs(section_class: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), base classes' fields included, as one line."""
    docs: dict[str, str] = {}
    for klass in reversed(section_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # a class made at run time has no source: no docstrings to read
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                is_doc = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant)
                if is_doc and isinstance(after.value.value, str):
                    docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_name(kind: Any) -> str:
    """A field type as `make keys` shows it: int, float, str, bool, list[str], or its Literal choices."""
    if typing.get_origin(kind) is typing.Literal:
        return " | ".join(str(choice) for choice in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return f"list[{typing.get_args(kind)[0].__name__}]"
    return getattr(kind, "__name__", str(kind))


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable key: the dataclass instance that holds it, the field's name, type and docstring."""

    owner: Any
    name: str
    kind: Any
    doc: str
    fixed: bool  # its change breaks an exact resume


def leaves(section: Any, prefix: str) -> dict[str, Leaf]:
    """Every key of a section by its dotted name, a nested section's (train.lora.rank) included; fixed for a
    resume as train/config.py's resume_fixed_keys says (every model key is)."""
    fixed = None if isinstance(section, ModelConfig) else resume_fixed_keys(section, prefix)

    def walk(node: Any, at: str) -> dict[str, Leaf]:
        found: dict[str, Leaf] = {}
        docs, types = field_docs(type(node)), field_types(type(node))
        for field in dataclasses.fields(node):
            key, value = f"{at}{field.name}", getattr(node, field.name)
            if dataclasses.is_dataclass(value):
                found |= walk(value, f"{key}.")
            else:
                is_fixed = fixed is None or key in fixed
                found[key] = Leaf(node, field.name, types[field.name], docs.get(field.name, ""), is_fixed)
        return found

    return walk(section, prefix)


def fixed_keys_of(section: Any, prefix: str) -> set[str]:
    """A section's keys whose change breaks an exact resume: a model's all, else the fields marked RESUME_FIXED."""
    return {key for key, leaf in leaves(section, prefix).items() if leaf.fixed}


_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _same_word(a: str, b: str) -> bool:
    """Equal, or one a stem of the other (accum/accumulated, save/saves), for words of 4+ letters."""
    return a == b or (min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)))


def _score(unknown: str, key: str, doc: str) -> float:
    """How well `key` (with its docstring) answers a user who typed `unknown`; 0 to about 2.5."""
    leaf, key_leaf = unknown.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1]
    name = difflib.SequenceMatcher(None, leaf, key_leaf).ratio()
    asked = _WORD.findall(leaf.lower())
    told = _words(f"{key_leaf} {doc}")
    covered = sum(any(_same_word(word, seen) for seen in told) for word in asked) / max(1, len(asked))
    initials = len(asked) > 1 and "".join(word[0] for word in asked) == key_leaf  # learning_rate -> lr
    return max(name, covered) + 0.5 * name + (1.0 if initials else 0.0)


def closest_key(unknown: str, candidates: dict[str, str]) -> str | None:
    """The candidate key (dotted, with its docstring) that best answers `unknown`, or None when none is close."""
    section, parent = unknown.split(".", 1)[0], unknown.rpartition(".")[0]
    nested = "." in parent  # train.lora.rnak: train.lora.rank before train.inner.rank

    def bonus(key: str) -> float:
        return 0.25 * (key.split(".", 1)[0] == section) + 0.25 * (nested and key.rpartition(".")[0] == parent)

    scored = [(_score(unknown, key, doc) + bonus(key), key) for key, doc in candidates.items()]
    best_score, best = max(scored, default=(0.0, None))
    return best if best_score >= 0.75 else None


def _default_text(section: Any, name: str) -> str:
    value = getattr(section, name)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return '""' if value == "" else str(value)


def _table(prefix: str, section: Any, skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for key, leaf in leaves(section, prefix).items():
        if leaf.name in skip and leaf.owner is section:
            continue
        cells = [f"`{key}`", type_name(leaf.kind), f"`{_default_text(leaf.owner, leaf.name)}`", leaf.doc]
        if leaf.fixed:
            cells[-1] += " Fixed for a resume."
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def key_reference() -> str:
    """Every config key with its type, default and docstring, as Markdown (what `make keys` prints)."""
    lines = [
        "# Config keys",
        "",
        "Generated by `make keys` from the docstrings of the config dataclasses (train/config.py, and each model's",
        "config class in train/models/); do not edit by hand. Set a key in a config file's section, or on the",
        'command line: `make train ARGS="train.lr=3e-4 model.n_layers=8"`. "Fixed for a resume": a run directory',
        "that holds a checkpoint refuses a change of that key.",
        "",
        "## Run",
        "",
        "| key | type | default | what it is |",
        "|---|---|---|---|",
        f"| `name` | str | `tiny` | {field_docs(RunConfig)['name']} |",
    ]
    for section in (DataConfig(), TrainConfig()):
        title = "data" if isinstance(section, DataConfig) else "train"
        lines += ["", f"## {title}", "", f"{type(section).__doc__}", "", *_table(f"{title}.", section)]
    for name, spec in registered().items():
        config = spec.new_config()
        lines += ["", f"## model (model.arch={name})", "", " ".join((type(config).__doc__ or "").split()), ""]
        lines += _table("model.", config, skip=("arch",))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.config_keys", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="", help="write the reference here (docs/config.md) instead of stdout")
    args = parser.parse_args(argv)
    if args.output:
        write_text_atomically(Path(args.output), key_reference())
    else:
        print(key_reference(), end="")
    return 0


if __name__ == "__main__":
    run_cli("keys", main)
