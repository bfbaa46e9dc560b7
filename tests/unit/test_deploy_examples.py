"""Every example config in deploy/ loads with its service's config class (examples never rot)."""

import importlib
import pathlib

import pytest

from services.common.config import load

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"
SECTIONS = {
    "room": "services.room.config:RoomConfig",
    "center": "services.center.config:CenterConfig",
    "dispatcher": "services.dispatcher.config:DispatcherConfig",
    "register": "services.register.config:RegisterConfig",
    "saver": "services.saver.config:SaverConfig",
    "coordinator": "services.coordinator.config:CoordinatorConfig",
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_example_config_loads(section):
    module, cls = SECTIONS[section].split(":")
    path = DEPLOY / f"{section}.example.toml"
    assert path.exists(), f"deploy/{path.name} is missing"
    common, cfg = load(getattr(importlib.import_module(module), cls), section, str(path), env={})
    assert common.redis_url and cfg is not None
