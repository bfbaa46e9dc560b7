"""deploy/compose and deploy/k8s stay deployable: every Kubernetes manifest is valid against the
Kubernetes schemas (kubernetes-validate, bundled, offline), and both deployments are checked
against the code they run. Each process's command line is parsed with the service's own
argument parser, its config file (a mounted file or a ConfigMap entry) and its environment are
loaded with the service's own config loader, and from that config come the ports the process
binds and serves /healthz on, which the probes, health checks and declared ports must match.
Docker and a cluster are not needed."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import pathlib
import re
import shlex
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from services.cli import COMMANDS
from services.common.config import PLACEHOLDER_PREFIX, CommonConfig, load

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
# the oldest Kubernetes release still in wide use and the newest kubernetes-validate knows
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

SECTIONS = {
    "room": "services.room.config:RoomConfig",
    "center": "services.center.config:CenterConfig",
    "dispatcher": "services.dispatcher.config:DispatcherConfig",
    "register": "services.register.config:RegisterConfig",
    "saver": "services.saver.config:SaverConfig",
    "coordinator": "services.coordinator.config:CoordinatorConfig",
}
HTTP_SERVICES = ("center", "dispatcher")  # /healthz on the HTTP port; the others on their metrics port
MYSQL_SERVICES = ("center", "saver")


def config_class(section: str):
    module, name = SECTIONS[section].split(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------ a Pylon process, from its command


@dataclasses.dataclass
class Process:
    """One `pylon <service>` process as a manifest starts it."""

    where: str                    # for messages: "compose room-1", "k8s statefulset/room"
    section: str
    config_path: str              # as the process sees it
    overrides: dict               # from command-line flags
    env: dict                     # resolved environment

    def load(self, host_path: pathlib.Path):
        common, cfg = load(config_class(self.section), self.section, str(host_path), env=self.env, **self.overrides)
        return common, cfg


def pylon_argv(command: list[str]) -> list[str]:
    """The arguments after `pylon`: the image's entrypoint is `pylon`, or a shell script ends in
    `exec pylon ...` (the room raises its open-file limit first)."""
    if command[:2] == ["/bin/sh", "-c"]:
        words = shlex.split(command[2])
        assert "exec" in words and words[words.index("exec") + 1] == "pylon", f"no `exec pylon` in {command[2]!r}"
        return words[words.index("exec") + 2:]
    return command[1:] if command and command[0] == "pylon" else command


def parse_process(where: str, argv: list[str], env: dict) -> Process:
    assert argv and argv[0] in SECTIONS, f"{where}: {argv[:1]} is not a pylon service"
    section = argv[0]
    parser = argparse.ArgumentParser(prog=f"pylon {section}", exit_on_error=False)
    importlib.import_module(COMMANDS[section][0]).add_arguments(parser)
    args = vars(parser.parse_args(argv[1:]))
    assert args.get("config"), f"{where}: no --config"
    fields = {f.name for f in dataclasses.fields(config_class(section))}
    overrides = {k: v for k, v in args.items() if k != "config" and v is not None}
    assert set(overrides) <= fields, f"{where}: flags {set(overrides) - fields} are not [{section}] settings"
    known_env = {f"PYLON_{f.name.upper()}" for f in dataclasses.fields(CommonConfig)}
    known_env |= {f"PYLON_PYLON_{f.name.upper()}" for f in dataclasses.fields(CommonConfig)}
    known_env |= {f"PYLON_{section.upper()}_{f.upper()}" for f in fields}
    unknown = {k for k in env if k.startswith("PYLON_")} - known_env
    assert not unknown, f"{where}: {sorted(unknown)} are no settings of {section} (a typo is silently ignored)"
    return Process(where, section, args["config"], overrides, env)


def health_port(section: str, cfg) -> int:
    port = cfg.port if section in HTTP_SERVICES else cfg.metrics_port
    assert port, f"{section}: /healthz is on {'port' if section in HTTP_SERVICES else 'metrics_port'}, which must be fixed (not 0)"
    return port


def bound_ports(section: str, cfg) -> set[int]:
    """Every TCP port the process (all instances of a room host) listens on."""
    if section == "room":
        k = cfg.instance_count()
        ports = {base + i for base in (cfg.port, cfg.grpc_port, cfg.metrics_port) for i in range(k)}
        return ports | ({cfg.shared_port} if cfg.shared_port else set())
    if section in HTTP_SERVICES:
        extra = [cfg.metrics_port + i for i in range(getattr(cfg, "processes", 1))] if cfg.metrics_port else []
        return {cfg.port, *extra}
    return {cfg.grpc_port, cfg.metrics_port}


def bind_host(section: str, cfg) -> str:
    return cfg.listen_host if section == "room" else cfg.host


def min_room_grace_s(cfg) -> float:
    """The longest a room host takes from SIGTERM to exit: the supervisor's kill of an instance
    still draining (after its hand-over window, its flush deadline and a margin)."""
    from services.room.supervisor import drain_deadline_s

    return drain_deadline_s(cfg)


# ------------------------------------------------------------------ compose

_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# what a required variable (${VAR:?message}) stands for in the test: long enough for an admin key
REQUIRED_VALUE = "compose-required-value"


def interpolate(value) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} with nothing set in the environment."""
    def one(m: re.Match) -> str:
        op, arg = m.group(2), m.group(3)
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            return REQUIRED_VALUE
        return ""
    return _VAR.sub(one, str(value))


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services() -> dict:
    return compose()["services"]


def pylon_compose_services() -> list[str]:
    return sorted(name for name, svc in compose_services().items() if svc.get("image", "").startswith("pylon"))


def compose_env(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v) for k, v in env.items()}


def compose_mounts(svc: dict) -> dict[str, pathlib.Path]:
    """container path -> host path of every bind mount."""
    mounts = {}
    for volume in svc.get("volumes") or []:
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def compose_process(name: str) -> tuple[Process, pathlib.Path]:
    svc = compose_services()[name]
    command = svc["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    process = parse_process(f"compose {name}", pylon_argv(command), compose_env(svc))
    mounts = compose_mounts(svc)
    assert process.config_path in mounts, f"compose {name}: --config {process.config_path} is not a mounted file"
    return process, mounts[process.config_path]


def seconds(duration: str) -> float:
    total, found = 0.0, False
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration)):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        found = True
    assert found, f"cannot read {duration!r} as a duration"
    return total


def flag(command: list[str], name: str) -> str:
    """The value of --name=VALUE or --name VALUE in a command."""
    for i, word in enumerate(command):
        if word == name:
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def test_compose_runs_every_service_and_two_rooms():
    services = compose_services()
    for required in ("redis", "mariadb", "register", "saver", "coordinator", "center", "dispatcher"):
        assert required in services, f"compose.yaml has no {required} service"
    rooms = [name for name in pylon_compose_services() if compose_process(name)[0].section == "room"]
    assert len(rooms) >= 2, f"compose.yaml runs {len(rooms)} room hosts, want 2 or more"
    sections = {compose_process(name)[0].section for name in pylon_compose_services()}
    assert sections == set(SECTIONS)


@pytest.mark.parametrize("name", sorted(compose()["services"]))
def test_compose_service_structure(name):
    services = compose_services()
    svc = services[name]
    assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"
    if "build" in svc:
        build = svc["build"]
        context = COMPOSE_DIR / (build if isinstance(build, str) else build["context"])
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    assert svc.get("command"), f"{name}: no command"
    depends = svc.get("depends_on") or {}
    for target in depends:
        assert target in services, f"{name} depends on {target}, which compose.yaml does not define"
        condition = depends[target].get("condition", "service_started") if isinstance(depends, dict) else "service_started"
        assert condition in ("service_started", "service_healthy", "service_completed_successfully")
        if condition == "service_healthy":
            assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
    for volume in svc.get("volumes") or []:
        source = volume.split(":")[0]
        if source.startswith((".", "/")):
            assert (COMPOSE_DIR / source).exists(), f"{name}: mounted {source} does not exist"
        else:
            assert source in (compose().get("volumes") or {}), f"{name}: named volume {source} is not declared"
    if svc.get("network_mode") == "host":
        # the host's ports are used directly; a `ports:` mapping would be ignored
        assert "ports" not in svc, f"{name}: ports are not published on the host network"


@pytest.mark.parametrize("name", pylon_compose_services())
def test_compose_pylon_service_config_health_and_drain(name):
    svc = compose_services()[name]
    process, path = compose_process(name)
    assert path.is_file(), f"{name}: {path} is missing"
    common, cfg = process.load(path)  # the service's own loader: unknown keys, bad values fail here
    test = svc["healthcheck"]["test"]
    urls = [u for u in re.findall(r"https?://[^'\"\s]+", " ".join(test)) if urlsplit(u).path == "/healthz"]
    assert urls, f"{name}: the healthcheck does not ask /healthz: {test}"
    assert urlsplit(urls[0]).port == health_port(process.section, cfg), \
        f"{name}: healthcheck asks port {urlsplit(urls[0]).port}, {process.section} serves /healthz on {health_port(process.section, cfg)}"
    nofile = svc.get("ulimits", {}).get("nofile", {})
    if process.section == "room":
        assert seconds(svc.get("stop_grace_period", "10s")) >= min_room_grace_s(cfg), \
            f"{name}: stop_grace_period is shorter than a drain ({min_room_grace_s(cfg)} s)"
        soft = nofile.get("soft") if isinstance(nofile, dict) else nofile
        assert soft and soft > cfg.per_instance_connections, f"{name}: nofile must exceed per_instance_connections"
    if process.section in MYSQL_SERVICES:
        mariadb = compose_services()["mariadb"]
        db_env = compose_env(mariadb)
        assert common.mysql_password == db_env["MARIADB_PASSWORD"], f"{name}: MySQL password differs from mariadb's"
        assert common.mysql_user == db_env["MARIADB_USER"] and common.mysql_database == db_env["MARIADB_DATABASE"]
        assert common.mysql_port == int(flag(mariadb["command"], "--port"))
    assert urlsplit(common.redis_url).port == int(flag(compose_services()["redis"]["command"], "--port"))


def test_compose_ports_do_not_collide():
    taken: dict[int, str] = {}
    for store in ("redis", "mariadb"):
        taken[int(flag(compose_services()[store]["command"], "--port"))] = store
    for name in pylon_compose_services():
        process, path = compose_process(name)
        _, cfg = process.load(path)
        for port in bound_ports(process.section, cfg):
            assert port not in taken, f"{name} and {taken.get(port)} both bind port {port} on the host network"
            taken[port] = name


# ------------------------------------------------------------------ Kubernetes


def k8s_files() -> list[pathlib.Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in k8s_files() for doc in yaml.safe_load_all(p.read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == kind}


def workloads() -> list[dict]:
    return [doc for _, doc in k8s_docs() if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def pylon_workloads() -> list[dict]:
    return [w for w in workloads()
            if any(c["image"].split(":")[0].rsplit("/", 1)[-1] == "pylon" for c in w["spec"]["template"]["spec"]["containers"])]


def k8s_env(container: dict, where: str) -> dict:
    secrets = by_kind("Secret")
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[item["name"]] = "10.0.0.7"
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["name"] in secrets, f"{where}: Secret {ref['name']} is not in deploy/k8s"
            data = secrets[ref["name"]].get("stringData", {})
            assert ref["key"] in data, f"{where}: Secret {ref['name']} has no key {ref['key']}"
            value = data[ref["key"]]
            # the example Secret holds placeholders the services refuse (test_config.py): the
            # config is checked as an operator who replaced them would run it
            if value.upper().startswith(PLACEHOLDER_PREFIX):
                value = f"replaced-{ref['key']}-0123456789"
            env[item["name"]] = value
        else:
            raise AssertionError(f"{where}: env {item['name']} from {source} is not understood by this test")
    return env


def k8s_process(workload: dict, tmp_path: pathlib.Path) -> tuple[Process, pathlib.Path, dict]:
    """The pylon process of a workload, its config file (written from the ConfigMap) and container."""
    where = f"k8s {workload['kind'].lower()}/{workload['metadata']['name']}"
    pod = workload["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["image"].split(":")[0].rsplit("/", 1)[-1] == "pylon"]
    argv = pylon_argv(container.get("command", ["pylon"]) + container.get("args", []))
    process = parse_process(where, argv, k8s_env(container, where))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_dir, file_name = process.config_path.rsplit("/", 1)
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == config_dir]
    volume = volumes[mount["name"]]
    assert "configMap" in volume, f"{where}: {config_dir} is not a ConfigMap volume"
    configmap = by_kind("ConfigMap").get(volume["configMap"]["name"])
    assert configmap is not None, f"{where}: ConfigMap {volume['configMap']['name']} is not in deploy/k8s"
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])} or {k: k for k in configmap["data"]}
    assert file_name in items, f"{where}: {process.config_path} is not among the mounted ConfigMap items"
    path = tmp_path / f"{workload['metadata']['name']}-{file_name}"
    path.write_text(configmap["data"][items[file_name]])
    return process, path, container


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_manifest_is_valid(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} holds no manifest"
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')} against {version}: "
                            f"{'.'.join(str(p) for p in exc.path)}: {exc.message}")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert sorted(listed) == [p.name for p in k8s_files()], "kustomization.yaml resources differ from deploy/k8s/*.yaml"
    names = {doc["metadata"]["name"] for _, doc in k8s_docs() if doc["kind"] == "Namespace"}
    assert kustomization.get("namespace") in names


@pytest.mark.parametrize("key", sorted(by_kind("ConfigMap")["pylon-config"]["data"]))
def test_k8s_configmap_files_load(key, tmp_path):
    section = key.removesuffix(".toml")
    assert key.endswith(".toml") and section in SECTIONS, f"pylon-config entry {key} is no service's config file"
    path = tmp_path / key
    path.write_text(by_kind("ConfigMap")["pylon-config"]["data"][key])
    load(config_class(section), section, str(path), env={})


def test_k8s_runs_every_service():
    sections = sorted(parse_process("k8s", pylon_argv(c.get("command", ["pylon"]) + c.get("args", [])), {}).section
                      for w in pylon_workloads() for c in w["spec"]["template"]["spec"]["containers"])
    assert sections == sorted(SECTIONS), f"one workload per service wanted, found {sections}"
    kinds = {w["metadata"]["name"]: w["kind"] for w in pylon_workloads()}
    assert kinds.pop("room") == "StatefulSet"
    assert set(kinds.values()) == {"Deployment"}


@pytest.mark.parametrize("name", sorted(w["metadata"]["name"] for w in pylon_workloads()))
def test_k8s_workload_against_its_config(name, tmp_path):
    (workload,) = [w for w in pylon_workloads() if w["metadata"]["name"] == name]
    process, path, container = k8s_process(workload, tmp_path)
    common, cfg = process.load(path)
    where, section = process.where, process.section
    pod = workload["spec"]["template"]["spec"]
    assert bind_host(section, cfg) == "0.0.0.0", f"{where}: binds {bind_host(section, cfg)}; probes and peers come from outside the pod"
    assert common.advertise_host == "10.0.0.7", f"{where}: PYLON_ADVERTISE_HOST is not set from the downward API"

    declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    bound = bound_ports(section, cfg)
    assert set(declared.values()) == bound, \
        f"{where}: declares ports {sorted(declared.values())}, the process binds {sorted(bound)}"

    for kind in ("livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        assert probe, f"{where}: no {kind}"
        handler = probe.get("httpGet") or probe.get("tcpSocket")
        assert handler, f"{where}: {kind} is neither httpGet nor tcpSocket"
        port = declared.get(handler["port"], handler["port"])
        if "httpGet" in probe:
            assert handler["path"] == "/healthz", f"{where}: {kind} asks {handler['path']}"
            assert port == health_port(section, cfg), \
                f"{where}: {kind} asks port {port}; {section} serves /healthz on {health_port(section, cfg)}"
        else:
            assert port in bound, f"{where}: {kind} checks port {port}, which the process does not bind"
    assert container["livenessProbe"].get("httpGet"), f"{where}: liveness must be /healthz"

    requests = container.get("resources", {}).get("requests", {})
    assert "cpu" in requests and "memory" in requests, f"{where}: no cpu/memory requests"
    if section in MYSQL_SERVICES:
        assert common.mysql_password and common.mysql_password == _mariadb_env()["MARIADB_PASSWORD"]
        assert common.mysql_user == _mariadb_env()["MARIADB_USER"]
        assert common.mysql_database == _mariadb_env()["MARIADB_DATABASE"]
        assert (common.mysql_host, common.mysql_port) in _service_addresses()
    if section == "center":
        assert len(cfg.admin_key) >= 8
    assert (urlsplit(common.redis_url).hostname, urlsplit(common.redis_url).port) in _service_addresses()

    if section == "room":
        assert pod.get("hostNetwork") is True and pod.get("dnsPolicy") == "ClusterFirstWithHostNet"
        assert pod.get("terminationGracePeriodSeconds", 30) >= min_room_grace_s(cfg), \
            f"{where}: terminationGracePeriodSeconds is shorter than a drain ({min_room_grace_s(cfg)} s)"
        # SIGTERM starts the drain; a preStop hook would spend the grace period before it
        assert "preStop" not in container.get("lifecycle", {}), f"{where}: the room drains on SIGTERM, not in preStop"
        script = container["command"][2]
        limit = re.search(r"ulimit -n (\d+)", script)
        assert limit and int(limit.group(1)) > cfg.per_instance_connections, \
            f"{where}: the open-file limit must be raised above per_instance_connections"
        for i in range(cfg.instance_count()):
            for kind, base in (("client", cfg.port), ("grpc", cfg.grpc_port), ("metrics", cfg.metrics_port)):
                assert declared.get(f"{kind}-{i}") == base + i, f"{where}: port {kind}-{i} should be {base + i}"


def _mariadb_env() -> dict:
    (container,) = by_kind("StatefulSet")["mariadb"]["spec"]["template"]["spec"]["containers"]
    return k8s_env(container, "k8s statefulset/mariadb")


def _service_addresses() -> set[tuple[str, int]]:
    return {(name, port["port"]) for name, svc in by_kind("Service").items() for port in svc["spec"]["ports"]}


def test_k8s_selectors_and_ports_match_workloads():
    pods = [(w["metadata"]["name"], w["spec"]["template"]["metadata"]["labels"],
             {p["name"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])})
            for w in workloads()]
    for w in workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{w['metadata']['name']}: selector"
        if w["kind"] == "StatefulSet":
            assert w["spec"]["serviceName"] in by_kind("Service"), f"{w['metadata']['name']}: no governing Service"
    for name, svc in by_kind("Service").items():
        matched = [p for p in pods if svc["spec"]["selector"].items() <= p[1].items()]
        assert matched, f"Service {name} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert all(target in p[2] for p in matched), f"Service {name}: targetPort {target} is no container port"
    for name, pdb in by_kind("PodDisruptionBudget").items():
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= p[1].items() for p in pods), f"PDB {name} selects no pod"
    covered = {name for name, pdb in by_kind("PodDisruptionBudget").items()}
    assert {w["metadata"]["name"] for w in pylon_workloads()} <= covered, "every Pylon workload has a PodDisruptionBudget"


def test_the_example_secret_holds_only_placeholders_the_services_refuse():
    """Applied unchanged, the cluster's center and saver stop with a config error instead of
    running with an admin key and a database password anyone can read here."""
    (secret,) = by_kind("Secret").values()
    values = secret["stringData"].values()
    assert values and all(v.upper().startswith(PLACEHOLDER_PREFIX) for v in values)
