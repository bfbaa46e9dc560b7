import pytest

from services.common.config import CommonConfig, ConfigError, build, load
from services.room.config import RoomConfig


def test_defaults_file_env_and_overrides(tmp_path):
    f = tmp_path / "pylon.toml"
    f.write_text('[pylon]\nregion = "eu"\n[room]\nport = 9000\nheartbeat_wifi_s = 400\n')
    common, room = load(RoomConfig, "room", str(f), env={"PYLON_ROOM_HEARTBEAT_GRACE_S": "3"}, grpc_port=9100)
    assert common.region == "eu" and room.port == 9000 and room.heartbeat_wifi_s == 400
    assert room.heartbeat_grace_s == 3 and room.grpc_port == 9100
    assert room.handshake_timeout_s == RoomConfig().handshake_timeout_s


def test_env_shortcut_for_common():
    assert build(CommonConfig, "pylon", {}, {"PYLON_REDIS_URL": "redis://h:1/0"}).redis_url == "redis://h:1/0"


@pytest.mark.parametrize("values, needle", [
    ({"port": "abc"}, "room.port"),
    ({"bogus": 1}, "unknown setting"),
    ({"heartbeat_min_s": 500, "heartbeat_max_s": 100}, "heartbeat_min_s"),
    ({"max_frame": 10}, "max_frame"),
    ({"shared_port": 70000}, "room.shared_port"),
    ({"storm_batch_items": 0}, "room.storm_batch_items"),
    ({"storm_batch_delay_ms": -1}, "room.storm_batch_delay_ms"),
    ({"connect_batch_delay_ms": 60_000}, "room.connect_batch_delay_ms"),
    ({"accept_wait_shed_s": -1}, "room.accept_wait_shed_s"),
    ({"accept_wait_shed_s": 7200}, "room.accept_wait_shed_s"),
])
def test_bad_config_is_a_clear_error(values, needle):
    with pytest.raises(ConfigError) as err:
        build(RoomConfig, "room", values, {})
    assert needle in str(err.value)


@pytest.mark.parametrize("kind, section, values, needle", [
    ("center", "center", {"admin_key": "CHANGE-ME-admin-key"}, "center.admin_key"),
    ("center", "center", {"admin_key": "change-me-please"}, "center.admin_key"),
    ("common", "pylon", {"mysql_password": "CHANGE-ME-mysql-password"}, "pylon.mysql_password"),
])
def test_the_example_secrets_placeholders_are_refused(kind, section, values, needle):
    from services.center.config import CenterConfig
    cls = CenterConfig if kind == "center" else CommonConfig
    with pytest.raises(ConfigError) as err:
        build(cls, section, values, {})
    assert needle in str(err.value) and "placeholder" in str(err.value)
    assert "admin-key" not in str(err.value) and "mysql-password" not in str(err.value)  # not echoed whole


def test_a_real_secret_passes():
    from services.center.config import CenterConfig
    assert build(CenterConfig, "center", {"admin_key": "3f9c0a7e5b1d2c4e"}, {}).admin_key == "3f9c0a7e5b1d2c4e"
    assert build(CommonConfig, "pylon", {"mysql_password": "s3cret-pass"}, {}).mysql_password == "s3cret-pass"


def test_heartbeat_by_network_and_clamp():
    cfg = RoomConfig()
    assert cfg.heartbeat_for("cellular") == 270 and cfg.heartbeat_for("wifi") == 360
    assert cfg.clamp_heartbeat(5) == cfg.heartbeat_min_s and cfg.clamp_heartbeat(10_000) == cfg.heartbeat_max_s


def test_instance_count_from_target():
    assert RoomConfig(instances=0, target_connections=1_000_000).instance_count() == 56
    assert RoomConfig(instances=0, target_connections=100_000).instance_count() == 6
