"""The settings table of docs/configuration.md, rendered from `ServerSettings` so it cannot drift.

    python -m app.settings_doc            # rewrite the table in docs/configuration.md
    python -m app.settings_doc --check    # exit 1 if the committed table differs (tests/test_settings_doc.py)

Only the text between the two markers is generated; the prose around it is written by hand. Each row
is one field: its variable name, type and bounds, default and `description`.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo

from app.settings import ServerSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START, END = "<!-- settings:start (python -m app.settings_doc) -->", "<!-- settings:end -->"
_BOUNDS = ((annotated_types.Ge, ">="), (annotated_types.Gt, ">"),
           (annotated_types.Le, "<="), (annotated_types.Lt, "<"))


def _kind(field: FieldInfo) -> str:
    """'int >= 1', 'one of `a`, `b`', 'list', ... for the type column."""
    annotation = field.annotation
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        kind = "one of " + ", ".join(f"`{a}`" for a in args)
    elif typing.get_origin(annotation) is tuple:
        kind = "list (comma-separated)"
    else:
        kind = getattr(args[0] if args else annotation, "__name__", str(annotation))
    bounds = [f"{sign} {getattr(m, cls.__name__.lower())}" for m in field.metadata
              for cls, sign in _BOUNDS if isinstance(m, cls)]
    return " ".join([kind, *bounds])


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    """One markdown row per `ServerSettings` field, in declaration order."""
    names = {field: env for env, field in ServerSettings.env_names().items()}
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{names[name]}` | {_kind(field)} | {_default(field.default)} | {meaning} |")
    return "\n".join(rows)


def render(doc: str) -> str:
    """`doc` with the text between the markers replaced by the current table."""
    head, found, rest = doc.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"{DOC.name} lacks the markers {START!r} ... {END!r}")
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{DOC} is out of date: run `python -m app.settings_doc`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
