"""CoordinatorConfig: defaults, file + env + CLI overrides, clear errors."""

import pytest

from services.common import config
from services.common.config import ConfigError
from services.coordinator.config import CoordinatorConfig
from services.coordinator.webhooks import DeliverySettings


def test_defaults_match_the_contract():
    c = config.build(CoordinatorConfig, "coordinator", {}, env={})
    assert (c.webhook_max_attempts, c.webhook_queue_per_app, c.webhook_rate_per_s) == (8, 10_000, 50.0)
    assert (c.webhook_backoff_base_s, c.webhook_backoff_cap_s) == (0.5, 30.0)
    assert (c.webhook_batch_max_events, c.webhook_batch_delay_s) == (100, 0.02)
    s = DeliverySettings.from_config(c)
    assert (s.max_attempts, s.queue_per_app, s.batch_max_events) == (8, 10_000, 100)


def test_file_env_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[coordinator]\nwebhook_rate_per_s = 5\ngrpc_port = 9000\n")
    _, c = config.load(CoordinatorConfig, "coordinator", str(path), env={"PYLON_COORDINATOR_WEBHOOK_MAX_ATTEMPTS": "3"},
                       grpc_port=9100, metrics_port=None)
    assert (c.webhook_rate_per_s, c.webhook_max_attempts, c.grpc_port) == (5.0, 3, 9100)


@pytest.mark.parametrize("values,key", [({"webhook_max_attempts": 0}, "webhook_max_attempts"),
                                        ({"webhook_backoff_cap_s": 0.1}, "webhook_backoff_cap_s"),
                                        ({"grpc_port": 70000}, "grpc_port"),
                                        ({"webhook_rate_per_s": "fast"}, "webhook_rate_per_s"),
                                        ({"no_such_key": 1}, "no_such_key")])
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        config.build(CoordinatorConfig, "coordinator", values, env={})


def test_example_config_file_loads():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2]
    common, c = config.load(CoordinatorConfig, "coordinator", str(root / "deploy" / "coordinator.example.toml"), env={})
    assert c == CoordinatorConfig(**{**c.__dict__})
    assert common.redis_url.startswith("redis://")
