"""The exact single command that reproduces a pipeline step: ``minitron <command> key=value``,
listing the keys whose value differs from the command's own defaults (``conf/<command>.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import shlex


def flatten(d, prefix: str = "") -> dict:
    """Nested dict -> ``{"a.b.c": value}`` (lists stay values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def hydra_value(v) -> str:
    """A value as a Hydra override writes it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return json.dumps(v)
    s = str(v)
    if any(c in s for c in " ,[]{}()='\"") or s in ("null", "true", "false"):
        return "'" + s.replace("'", "\\'") + "'"
    return s


def overrides(command: str, config) -> list[str]:
    """``key=value`` for every key of ``config`` that differs from the command's defaults."""
    from minitron_mcore.utils.config import compose_config

    default = flatten(dataclasses.asdict(compose_config(command, type(config), [])))
    mine = flatten(dataclasses.asdict(config))
    return [f"{k}={hydra_value(v)}" for k, v in mine.items() if default.get(k, object()) != v]


#: keys a reader looks for first, in this order; the rest follow in the config's field order
LEADING_KEYS = ("load", "teacher", "save", "scores")


def command_line(step) -> str:
    args = overrides(step.command, step.config)
    rank = {k: i for i, k in enumerate(LEADING_KEYS)}
    args.sort(key=lambda a: rank.get(a.split("=", 1)[0], len(rank)))  # stable for the rest
    return " ".join(["minitron", step.command] + [shlex.quote(a) for a in args])
