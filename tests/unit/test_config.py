from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from foveal.config import Settings, load_settings


def test_defaults_have_the_reference_tiers() -> None:
    s = load_settings()
    assert [t.name for t in s.tiers] == ["t1", "t4", "t16", "t64", "t256"]
    assert s.store.url.startswith("sqlite:///") and not s.auth.enabled


def test_env_nested_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text("gateway:\n  port: 9000\n  host: 127.0.0.2\nlimits:\n  max_images: 2\n")
    monkeypatch.setenv("FOVEAL_GATEWAY__PORT", "9100")
    s = load_settings(cfg)
    assert s.gateway.port == 9100  # env beats the file
    assert s.gateway.host == "127.0.0.2" and s.limits.max_images == 2
    assert load_settings(cfg, limits={"max_images": 5}).limits.max_images == 5  # args beat env


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text("gatway:\n  port: 1\n")
    with pytest.raises(ValidationError, match="gatway"):
        load_settings(cfg)


def test_tier_validation() -> None:
    with pytest.raises(ValidationError, match="unique"):
        Settings(tiers=[{"name": "a", "visual_tokens": 1}, {"name": "a", "visual_tokens": 2}])
    with pytest.raises(ValidationError, match="not a tier"):
        Settings(policy={"default_tier": "t9"})
    with pytest.raises(ValidationError):
        Settings(tiers=[{"name": "auto", "visual_tokens": 1}])


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_every_field_is_documented() -> None:
    schema = Settings.model_json_schema()

    def walk(props: dict, where: str) -> None:
        for name, prop in props.items():
            assert prop.get("description"), f"{where}.{name} has no description"

    for name, sub in schema["$defs"].items():
        walk(sub.get("properties", {}), name)
