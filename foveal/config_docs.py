"""Renders the settings' JSON schema as the Markdown reference in docs/configuration.md."""

from __future__ import annotations

import json
from typing import Any

from foveal.config import Settings

__all__ = ["render_reference"]

_HEADER = """# Configuration reference

Generated from the settings model by `foveal config docs > docs/configuration-reference.md`
(a test fails when it drifts). Every field can be set in the YAML file (`--config` or
`FOVEAL_CONFIG`), or as an environment variable `FOVEAL_<SECTION>__<FIELD>` (e.g.
`FOVEAL_GATEWAY__PORT=9000`); lists and objects take JSON in the environment.
"""


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return "required"
    return f"`{json.dumps(prop['default'])}`"


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " \\| ".join(_type(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if prop.get("type") == "array":
        return f"list of {_type(prop.get('items', {}))}"
    return str(prop.get("type", "any"))


def _table(props: dict[str, Any], prefix: str) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, prop in props.items():
        desc = prop.get("description", "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{prefix}{name}` | {_type(prop)} | {_default(prop)} | {desc} |")
    return lines


def render_reference() -> str:
    schema = Settings.model_json_schema()
    defs = schema.get("$defs", {})
    out = [_HEADER, "## Top level", ""]
    top = {k: v for k, v in schema["properties"].items() if "$ref" not in v}
    out += _table(top, "")
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref")
        if ref is None:
            continue
        out += ["", f"## `{name}`", ""]
        out += _table(defs[ref.rsplit("/", 1)[-1]]["properties"], f"{name}.")
    for sub in ("TierSettings", "EndpointSettings"):
        out += ["", f"## {sub} (items of `tiers` / `tiers[].endpoints`)", ""]
        out += _table(defs[sub]["properties"], "")
    return "\n".join(out) + "\n"
