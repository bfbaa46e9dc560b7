"""`pylon up`'s watch loop: a dead process is started again after its backoff (no network)."""

from __future__ import annotations

from services.launcher.main import watch


class FakeCluster:
    def __init__(self, names, fail_restarts: int = 0) -> None:
        self._names = list(names)
        self.dead: set[str] = set()
        self.restarts: list[str] = []
        self.fail_restarts = fail_restarts
        self.started_at = {n: 0.0 for n in names}

    def names(self):
        return self._names

    def alive(self, name):
        return name not in self.dead

    def exit_code(self, name):
        return -9 if name in self.dead else None

    def log_path(self, name):
        return f"/tmp/{name}.log"

    def restart(self, name):
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise RuntimeError(f"{name} exited with 1")
        self.restarts.append(name)
        self.dead.discard(name)


def _run(cluster, polls: int, on_poll=None):
    count = 0

    def stopping():
        nonlocal count
        count += 1
        if on_poll:
            on_poll(count)
        return count > polls

    watch(cluster, stopping, poll_s=0.0)


def test_dead_service_is_restarted_and_others_left_alone(monkeypatch, capsys):
    from services.launcher import procs

    monkeypatch.setattr(procs.RestartBackoff, "died", lambda self, lived: 0.0)
    c = FakeCluster(["register", "saver", "room", "redis"])
    _run(c, 50, on_poll=lambda n: c.dead.add("saver") if n == 3 else None)
    assert c.restarts == ["saver"]
    err = capsys.readouterr().err
    assert "saver was killed by SIGKILL" in err and "saver restarted" in err and "/tmp/saver.log" in err


def test_failed_restart_is_tried_again(monkeypatch, capsys):
    from services.launcher import procs

    monkeypatch.setattr(procs.RestartBackoff, "died", lambda self, lived: 0.0)
    c = FakeCluster(["center"], fail_restarts=2)
    c.dead.add("center")
    _run(c, 200)
    assert c.restarts == ["center"]
    assert capsys.readouterr().err.count("restarting center failed") == 2


def test_nothing_restarted_while_stopping():
    c = FakeCluster(["room"])
    c.dead.add("room")
    watch(c, lambda: True, poll_s=0.0)
    assert c.restarts == []
