"""Copy the router's settings schema into the foveal chart's values.schema.json.

The chart renders `values.config` verbatim as the router's config file, so `helm install` checks
that block against the same schema `foveal.config.Settings` enforces at start-up: a typo or a bad
value fails the install (with the key's path) instead of crash-looping the router pod.

    python scripts/helm_config_schema.py          # rewrite helm/foveal/values.schema.json
    python scripts/helm_config_schema.py --check  # exit 1 when it is out of date

Only `properties.config` and the `definitions` named `config.*` are generated; the rest of the
chart's schema is written by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from foveal.config import Settings

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "helm" / "foveal" / "values.schema.json"
_PREFIX = "config."
_DESCRIPTION = (
    "The router's settings file (/etc/foveal/config.yaml), rendered verbatim: Foveal's own "
    "snake_case keys (docs/configuration-reference.md). Generated from foveal.config.Settings "
    "by scripts/helm_config_schema.py."
)


def _rewrite_refs(node: Any) -> Any:
    """Pydantic's `#/$defs/X` references become `#/definitions/config.X` (draft-07 layout)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = "#/definitions/" + _PREFIX + value.removeprefix("#/$defs/")
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def updated_schema(current: dict[str, Any]) -> dict[str, Any]:
    """The chart schema with its config part regenerated from the settings model."""
    settings = Settings.model_json_schema()
    defs = settings.pop("$defs", {})
    settings.pop("title", None)
    settings["description"] = _DESCRIPTION
    schema = json.loads(json.dumps(current))  # a deep copy
    schema["properties"]["config"] = _rewrite_refs(settings)
    kept = {k: v for k, v in schema.get("definitions", {}).items() if not k.startswith(_PREFIX)}
    generated = {_PREFIX + name: _rewrite_refs(body) for name, body in sorted(defs.items())}
    schema["definitions"] = {**kept, **generated}
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    args = parser.parse_args(argv)
    text = SCHEMA_PATH.read_text()
    wanted = render(updated_schema(json.loads(text)))
    if args.check:
        if text != wanted:
            print(
                f"{SCHEMA_PATH} is out of date with foveal.config.Settings: "
                "run python scripts/helm_config_schema.py",
                file=sys.stderr,
            )
            return 1
        return 0
    SCHEMA_PATH.write_text(wanted)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
