"""Per-module overrides in ``quantization_config.dynamic``, the convention GPTQModel writes and vLLM reads.

Each key is a regular expression over a module's name in the checkpoint, prefixed ``+:`` (the module is
quantized with the value's keys, e.g. ``{"bits": 4, "group_size": 128, "sym": true}``, overriding the
config's own) or ``-:`` (the module is not quantized). The first rule whose pattern matches the start of the
name applies (``re.match``, as vLLM's ``get_dynamic_override``); a name no rule matches takes the base config.
vLLM fuses q/k/v and gate/up into one linear and requires the same override on every part.
"""

from __future__ import annotations

import re
from typing import Any

OVERRIDABLE = ("bits", "group_size", "sym", "desc_act")


def override_rule(name: str) -> str:
    """The key of a rule for exactly the module ``name``."""
    return f"+:^{re.escape(name)}$"


def skip_rule(name: str) -> str:
    """The key of a rule that leaves the module ``name`` unquantized."""
    return f"-:^{re.escape(name)}$"


def module_settings(qc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The quantization settings of module ``name`` (the config's ``bits``, ``group_size``, ``sym`` and
    ``desc_act`` with the first matching ``dynamic`` rule's overrides), or None when a rule excludes it."""
    base = {key: qc.get(key) for key in OVERRIDABLE}
    for pattern, values in (qc.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), name):
            return None if negative else {**base, **{k: v for k, v in (values or {}).items() if k in OVERRIDABLE}}
    return base
