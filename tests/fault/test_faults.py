"""Fault tests: kill -9 each process, cut three network paths, crash the whole host, under load.

One system (real Redis, MariaDB and service processes, tests/fault/system.py) and one steady
load (SDK clients and a publisher, tests/fault/load.py) serve every scenario of this module, in
turn. Each scenario:

1. waits until the system is whole (every process up, every client connected, presence right, a
   push reaches every client); a system left broken by the previous scenario is repaired first;
2. runs the publisher at RATE_PER_S, injects the fault, heals it (the test starts the killed
   process again on the same ports and data; a room instance is restarted by its supervisor; a
   cut path comes back by itself after its black hole);
3. checks that the system healed by itself (all clients connected again, presence right, a push
   after the fault reaches its handler within PROBE_S) and that every msg_id whose push returned
   200 reached the app handler exactly once within DELIVER_S of the heal; that includes pushes to
   a user without a client, sent before the fault, whose client connects after it.

The faults: kill -9 of a room instance, register, saver, coordinator, center, dispatcher, Redis
(restarted on its append-only file) and MariaDB; cuts of client-room, room-register and
saver-Redis; kill -9 of every process at once (a host crash). Beyond that list: kill -9 of the
room supervisor, every register client cut at once, center-room gRPC cut, and Redis restarted
without its data.

What each fault cost is printed as one JSON line (``pytest -s``) and written to the file named by
PYLON_FAULT_RESULTS, or to fault-results.json in the system's temp dir (kept when a scenario
failed, with every service log under logs/, or always with PYLON_FAULT_KEEP=1).

    .venv/bin/pytest -s tests/fault
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.fault.load import LoadHarness
from tests.fault.system import FaultSystem, FaultSystemError

RATE_PER_S = 25       # pushes per second, one uid each
CLIENTS = 6
STEADY_S = 1.5        # load before the fault
DOWN_S = 1.0          # a killed process stays dead this long before the test starts it again
BLACKHOLE_S = 1.0     # a cut path also black-holes new connections this long
AFTER_S = 2.0         # load after the system is whole again
ACK_SAMPLE = 30       # delivered messages whose server state is read after each scenario
ACK_WAIT_S = 5.0      # ... until all of them are acked, at most this long
OFFLINE_PUSHES = 20   # pushes to a uid with no client, before the fault; its client connects after
READY_S = 5.0         # before a scenario: the system whole (else repaired)
RECOVER_S = 20.0      # after the heal: every client connected, presence right
PROBE_S = 5.0         # a push after the fault reaches its handler within this
DELIVER_S = 20.0      # after the heal: every accepted msg_id delivered


@dataclass
class Env:
    system: FaultSystem
    harness: LoadHarness
    results_path: str
    results: list[dict] = field(default_factory=list)
    failed: bool = False

    def save(self) -> None:
        with open(self.results_path, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rate_per_s": RATE_PER_S,
                       "clients": CLIENTS, "room_instances": self.system.room_instances,
                       "scenarios": self.results}, fh, indent=2)
            fh.write("\n")


@pytest.fixture(scope="module")
def env():
    base = tempfile.mkdtemp(prefix="pylon-fault-")
    system = FaultSystem(base)
    harness = None
    started = time.monotonic()
    try:
        system.start()
        harness = LoadHarness(system.center_url, system.dispatcher_url, system.app, clients=CLIENTS)
        harness.start()
    except BaseException:
        if harness is not None:
            harness.close()
        system.stop()
        print(f"fault system failed to start; logs kept in {system.logs}")
        raise
    e = Env(system, harness, os.environ.get("PYLON_FAULT_RESULTS") or os.path.join(base, "fault-results.json"))
    print(f"\nfault system up in {time.monotonic() - started:.1f} s in {base}")
    try:
        yield e
    finally:
        harness.close()
        system.stop()
        e.save()
        print(f"fault results: {e.results_path}")
        if e.failed or os.environ.get("PYLON_FAULT_KEEP"):
            print(f"fault test dir kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- waiting


def _deadline_loop(timeout_s: float, step_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        yield
        if time.monotonic() > deadline:
            return
        time.sleep(step_s)


def whole(e: Env) -> list[str]:
    """What keeps the system from being whole right now (empty: whole)."""
    out = e.system.problems()
    if out:
        return out
    view = e.harness.client_view()
    for uid, v in view.items():
        if not v["connected"]:
            closed = f", closed: {v['close_reason']}" if v["state"] == "closed" else ""
            out.append(f"client {uid} is {v['state']} (last disconnect: {v['last_disconnect'] or '-'}{closed})")
    if out:
        return out
    presence = e.harness.presence()
    for uid, p in presence.items():
        sessions = p.get("sessions") or []
        port = view[uid]["port"]
        if p.get("status") != 200:
            out.append(f"presence of {uid}: HTTP {p.get('status')} {p.get('error') or ''}".strip())
        elif not p.get("online"):
            out.append(f"presence of {uid}: offline while its client is connected to port {port}")
        elif len(sessions) != 1 or not str(sessions[0].get("instance", "")).endswith(f":{port}"):
            out.append(f"presence of {uid}: sessions {[s.get('instance') for s in sessions]}, "
                       f"its client is on port {port}")
    return out


def wait_whole(e: Env, timeout_s: float) -> tuple[bool, list[str]]:
    last: list[str] = []
    for _ in _deadline_loop(timeout_s, 0.2):
        last = whole(e)
        if not last:
            return True, []
    return False, last


def wait_delivered(e: Env, ids, until: float) -> list[int]:
    missing = e.harness.ledger.missing(ids)
    while missing and time.monotonic() < until:
        time.sleep(0.1)
        missing = e.harness.ledger.missing(missing)
    return missing


# ---------------------------------------------------------------------- faults


@dataclass
class Fault:
    name: str
    inject: Callable[[Env, dict], None]   # records what it did in the dict
    heal: Callable[[Env, dict], None]     # returns once the fault is over (raises FaultSystemError if it is not)
    watch: tuple[str, ...] = ()           # services whose logs explain a failure
    during: Callable[[Env, dict], None] | None = None  # what else happens while the fault lasts


def kill_and_restart(name: str) -> tuple[Callable, Callable]:
    def inject(e: Env, info: dict) -> None:
        info["killed_pid"] = e.system.kill(name)

    def heal(e: Env, info: dict) -> None:
        time.sleep(DOWN_S)
        t = time.monotonic()
        e.system.restart(name, "restarted after kill -9")
        info["restart_s"] = round(time.monotonic() - t, 3)

    return inject, heal


def _kill_room_instance(e: Env, info: dict) -> None:
    ports = [v["port"] for v in e.harness.client_view().values()]
    counts = [ports.count(e.system.room_port(i)) for i in range(e.system.room_instances)]
    i = counts.index(max(counts))  # the instance holding most of the clients
    info.update(instance=i, clients_on_it=counts[i], killed_pid=e.system.kill_room_instance(i))


def _room_instance_restarted(e: Env, info: dict) -> None:
    i, old = info["instance"], info["killed_pid"]
    for _ in _deadline_loop(RECOVER_S, 0.1):
        pid = e.system.room_instance_pid(i)
        if pid is not None and pid != old:
            info["new_pid"] = pid
            return
    raise FaultSystemError(f"room instance {i} (port {e.system.room_port(i)}, pid {old} killed) was not restarted "
                           f"by its supervisor within {RECOVER_S} s")


def _kill_room_supervisor(e: Env, info: dict) -> None:
    pid, instances = e.system.kill_room_supervisor()
    info.update(killed_pid=pid, instances=instances)


def _restart_room_tier(e: Env, info: dict) -> None:
    # the orphaned instances drain and exit on their own; a new tier can bind the ports after that
    left = e.system.wait_gone(info["instances"], RECOVER_S)
    info["instances_gone_s"] = round(time.monotonic() - info["t_inject"], 3)
    if left:
        raise FaultSystemError(f"room instances {left} still run {RECOVER_S} s after their supervisor was killed")
    t = time.monotonic()
    e.system.restart("room", "restarted after kill -9 of the supervisor")
    info["restart_s"] = round(time.monotonic() - t, 3)


def cut(*proxies: str, rooms_only: bool = False) -> tuple[Callable, Callable]:
    """Cut the paths through ``proxies``; with ``rooms_only`` just the room instances' connections."""
    def inject(e: Env, info: dict) -> None:
        def only_for(proxy):
            if not rooms_only:
                return None
            known = e.system.room_client_ports(proxy.listen[1])  # looked up once, before the cut
            return lambda peer: peer[1] in known or e.system.from_rooms(peer, proxy.listen[1])

        info["connections_cut"] = {p: e.system.proxies[p].cut(BLACKHOLE_S, only_for(e.system.proxies[p]))
                                   for p in proxies}

    return inject, _blackhole_ends


def _blackhole_ends(e: Env, info: dict) -> None:
    time.sleep(BLACKHOLE_S)  # the cut's black hole lasts this long; the proxy ends it by itself


def _kill_redis_and_lose_data(e: Env, info: dict) -> None:
    info["killed_pid"] = e.system.kill("redis")
    info["deleted"] = e.system.wipe_redis()


def _restart_empty_redis(e: Env, info: dict) -> None:
    time.sleep(DOWN_S)
    e.system.restart("redis")


def _crash_host(e: Env, info: dict) -> None:
    info["killed_pids"] = len(e.system.crash_host())


def _restart_host(e: Env, info: dict) -> None:
    time.sleep(DOWN_S)
    t = time.monotonic()
    e.system.restart_all("restarted after a host crash (kill -9 of every process)")
    info["restart_s"] = round(time.monotonic() - t, 3)


def _new_client(e: Env, info: dict) -> None:
    """A client that connects while the fault lasts: its session must be registered once it is over."""
    info["new_client"] = e.harness.add_client(f"late-{len(e.harness.uids)}")


def _rooms(e: Env) -> list[str]:
    return [f"room{i}" for i in range(e.system.room_instances)]


def _cut_client_room(e: Env, info: dict) -> None:
    info["connections_cut"] = {p: e.system.proxies[p].cut(BLACKHOLE_S) for p in _rooms(e)}


def _cut_room_grpc(e: Env, info: dict) -> None:
    info["connections_cut"] = {p: e.system.proxies[p].cut(BLACKHOLE_S) for p in (f"{r}-grpc" for r in _rooms(e))}


FAULTS = [
    Fault("kill_room_instance", _kill_room_instance, _room_instance_restarted, ("room",)),
    # beyond the list: the supervisor dies, its instances drain and exit, the test starts the tier again
    Fault("kill_room_supervisor", _kill_room_supervisor, _restart_room_tier, ("room",)),
    Fault("kill_register", *kill_and_restart("register"), ("register", "room", "center")),
    Fault("kill_saver", *kill_and_restart("saver"), ("saver", "room", "center")),
    Fault("kill_coordinator", *kill_and_restart("coordinator"), ("coordinator", "room")),
    Fault("kill_center", *kill_and_restart("center"), ("center",)),
    Fault("kill_dispatcher", *kill_and_restart("dispatcher"), ("dispatcher",)),
    Fault("kill_redis", *kill_and_restart("redis"), ("redis", "register", "saver", "room", "center")),
    Fault("kill_mariadb", *kill_and_restart("mariadb"), ("mariadb", "saver", "center")),
    Fault("cut_client_room", _cut_client_room, _blackhole_ends, ("room",)),
    Fault("cut_room_register", *cut("register", rooms_only=True), ("room", "register"), during=_new_client),
    Fault("cut_saver_redis", *cut("saver-redis"), ("saver", "room", "center")),
    # beyond the list: every connection to register cut at once (center's and coordinator's too)
    Fault("cut_register_all_clients", *cut("register"), ("room", "register", "center")),
    # beyond the list: the internal gRPC path to the room instances (center's Room.Push) cut while
    # the clients stay connected
    Fault("cut_center_room", _cut_room_grpc, _blackhole_ends, ("center", "room")),
    Fault("host_crash", _crash_host, _restart_host, ("room", "register", "saver", "center", "redis", "mariadb")),
    # beyond the kill list, last because what it breaks may outlast the scenario: Redis comes back
    # empty (its disk lost); register's epoch changes, rooms register their sessions again, the
    # saver rebuilds the inboxes from MySQL
    Fault("redis_data_lost", _kill_redis_and_lose_data, _restart_empty_redis,
          ("redis", "register", "saver", "room", "center")),
]


# ---------------------------------------------------------------------- the scenario


def _ack_sample(e: Env, accepted: dict, t_fault: float) -> dict:
    """Do the server's records agree? The ACK_SAMPLE delivered messages sent nearest the fault must
    come to state acked (a lost ACK means a redelivery at the next connect). Measured, not asserted."""
    delivered = [m for m in accepted if e.harness.ledger.first_delivery(m) is not None]
    sample = sorted(delivered, key=lambda m: abs(accepted[m].t - t_fault))[:ACK_SAMPLE]
    t0 = time.monotonic()
    states: dict[int, str] = {}
    for _ in _deadline_loop(ACK_WAIT_S, 0.25):
        states = e.harness.states(sample)
        if all(v == "acked" for v in states.values()):
            break
    left = Counter(v for v in states.values() if v != "acked")
    return {"sampled": len(sample), "not_acked": sum(left.values()), "not_acked_states": dict(left),
            "waited_s": round(time.monotonic() - t0, 2)}


def _state(e: Env, msg_id: int) -> str:
    """The message's state as the API reports it (stored: waiting in its inbox; delivered: sent, not acked)."""
    try:
        status, body = e.system.api("GET", f"/v1/messages/{msg_id}")
    except OSError as exc:
        return f"unknown ({exc})"
    return body.get("state", f"HTTP {status}") if status == 200 else f"HTTP {status} {body.get('error', '')}"


def _evidence(e: Env, fault: Fault) -> str:
    parts = []
    for name in fault.watch:
        tail = e.system.log_tail(name, 12, grep=("ERROR", "WARNING", "Traceback", "Error", "error", "fault test"))
        parts.append(f"--- {name} log (warnings/errors, last 12):\n{tail or '(none)'}")
    return "\n".join(parts)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(env: Env, fault: Fault) -> None:
    try:
        _scenario(env, fault)
    except BaseException:
        env.failed = True  # keep the logs
        raise
    finally:
        env.harness.stop_publisher()  # an error mid-scenario must not leave the load running into the next one


def _scenario(env: Env, fault: Fault) -> None:
    e, h, name = env, env.harness, fault.name
    rec: dict = {"fault": name}
    failures: list[str] = []
    t_begin = time.monotonic()

    ok, why = wait_whole(e, READY_S)
    if not ok:
        did = e.system.repair()
        if not did:  # every process is up, yet clients or presence are wrong: connect every client anew
            e.system.restart_rooms()
            did = ["restarted the room tier"]
        rec["repaired_before"] = {"why": why, "did": did, "clients_replaced": h.revive_closed()}
        ok, why = wait_whole(e, RECOVER_S + 10)
        if not ok:
            e.failed = True
            e.results.append(rec | {"passed": False, "failures": [f"system not whole before the fault: {why}"]})
            e.save()
            pytest.fail(f"{name}: the system is not whole before the fault, even after a repair: {why}")
    before = h.probe(f"{name}:before", PROBE_S)
    if any(v is None for v in before.values()):
        failures.append(f"before the fault a push did not reach {sorted(u for u, v in before.items() if v is None)}")
    counters0 = h.counters()
    clients0 = len(h.uids)
    proxy0 = {k: p.stats() for k, p in e.system.proxies.items()}

    # an inbox that must survive the fault: accepted while its user is offline, fetched after
    offline = h.uid_for(f"offline-{name}")
    offline_ids = h.push_to(offline, OFFLINE_PUSHES, name)
    rec["offline_accepted"] = len(offline_ids)
    if len(offline_ids) < OFFLINE_PUSHES:
        failures.append(f"before the fault only {len(offline_ids)} of {OFFLINE_PUSHES} pushes to offline {offline} "
                        f"were accepted")

    h.start_publisher(name, RATE_PER_S)
    time.sleep(STEADY_S)  # steady load before the fault; nothing is waited for here
    t_fault = time.monotonic()
    info: dict = {"t_inject": t_fault}
    rec["fault_info"] = info
    fault.inject(e, info)
    if fault.during is not None:
        fault.during(e, info)
    try:
        fault.heal(e, info)
    except FaultSystemError as exc:
        failures.append(f"not healed: {exc}")
    t_healed = time.monotonic()
    rec["fault_to_healed_s"] = round(t_healed - t_fault, 3)
    info.pop("t_inject")

    ok, why = wait_whole(e, RECOVER_S)
    t_whole = time.monotonic()
    rec["healed_to_whole_s"] = round(t_whole - t_healed, 3) if ok else None
    if not ok:
        failures.append(f"not whole {RECOVER_S} s after the heal: {why}")
    time.sleep(AFTER_S)  # steady load once whole again
    pub = h.stop_publisher()
    t_offline_online = time.monotonic()
    h.add_client(f"offline-{name}")  # the offline user comes online: its inbox must be all there

    after = h.probe(f"{name}:after", PROBE_S)
    rec["probe_after_s"] = after
    late = sorted(u for u, v in after.items() if v is None)
    if late:
        view = h.client_view()
        why = {u: f"{view[u]['state']}" + (f" ({view[u]['close_reason']})" if view[u]["close_reason"] else "")
               for u in late}
        failures.append(f"a push after the fault did not reach its handler within {PROBE_S} s for {late}; "
                        f"their clients: {why}")

    accepted = h.ledger.accepted_in(name)
    for phase in ("before", "after"):
        accepted.update(h.ledger.accepted_in(f"{name}:{phase}"))
    missing = wait_delivered(e, accepted, max(t_healed + DELIVER_S, time.monotonic() + 1))
    acks = _ack_sample(e, accepted, t_fault)
    t_done = time.monotonic()
    dups = h.ledger.new_duplicates()
    wrong = h.ledger.wrong_uid(accepted)
    first = {m: h.ledger.first_delivery(m) for m in accepted}
    latencies = [first[m] - a.t for m, a in accepted.items() if first[m] is not None and a.uid != offline]
    # the backlog of the fault: pushes accepted from the start of the load until the system was whole
    backlog = [first[m] for m, a in accepted.items() if a.t <= t_whole and first[m] is not None and a.uid != offline]
    inbox = [first.get(m) for m in offline_ids]
    counters1 = h.counters()
    proxy1 = {k: p.stats() for k, p in e.system.proxies.items()}

    rec.update({
        "accepted": len(accepted),
        "delivered": len(accepted) - len(missing),
        "missing": len(missing),
        "duplicates_to_app": len(dups),
        # time from the heal until every push accepted before the system was whole had reached its handler
        "all_delivered_after_heal_s": (round(max(0.0, max(backlog) - t_healed), 3) if backlog and not missing
                                       else None),
        "max_push_to_handler_s": round(max(latencies), 3) if latencies else None,
        # the offline user's inbox, from its client's start until the last of it was handed over
        "offline_inbox_s": (round(max(inbox) - t_offline_online, 3) if inbox and None not in inbox else None),
        "publisher": pub.to_dict(t_fault),
        # reconnects: connects less the first ones of clients added in this scenario
        "sdk": {k: counters1[k] - counters0[k] for k in counters1} | {
            "reconnects": counters1["connects"] - counters0["connects"] - (len(h.uids) - clients0)},
        "proxy_connections_cut": sum(proxy1[k]["aborted"] - proxy0[k]["aborted"] for k in proxy1),
        "ack_sample": acks,
        "scenario_s": round(t_done - t_begin, 1),
    })
    if missing:
        t_acc = {m: round(accepted[m].t - t_fault, 2) for m in missing[:20]}
        states = rec["missing_states"] = {str(m): _state(e, m) for m in missing[:5]}
        view = h.client_view()
        # one line each: a long line is cut short where CI output is shown
        failures.append(f"{len(missing)} of {len(accepted)} accepted msg_ids never reached the handler within "
                        f"{DELIVER_S} s of the heal (t = seconds after the fault):\n" + "\n".join(
                            f"  {m} uid {accepted[m].uid} t {t_acc[m]:+.2f} server {states.get(str(m), '-')} "
                            f"client {view.get(accepted[m].uid, {}).get('state', '?')} port {view.get(accepted[m].uid, {}).get('port')}"
                            for m in missing[:20]))
    if dups:
        failures.append(f"{len(dups)} msg_ids handed to the app more than once: {dict(list(dups.items())[:20])}")
    if wrong:
        failures.append(f"msg_ids handed to the wrong uid: {wrong[:10]}")
    rec["passed"] = not failures
    rec["failures"] = failures
    e.results.append(rec)
    e.save()
    print("\nFAULT " + json.dumps(rec, sort_keys=True))
    if failures:
        e.failed = True
        pytest.fail(f"{name}:\n" + "\n".join(failures) + "\n" + _evidence(e, fault), pytrace=False)
