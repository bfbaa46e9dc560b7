import pytest

from services.center.auth import Authenticator, Principal, bearer_key
from services.center.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from services.center.push import chunks_by_bytes, message_size, plan_room_pushes
from services.common.apps import App
from services.common.pb import internal_pb2 as pb


def msg(i, uid, app="a", payload=b"p"):
    return pb.StoredMessage(msg_id=i, uid=uid, app=app, payload=payload)


def user(uid, *sessions):
    return pb.UserSessions(uid=uid, sessions=[pb.Session(uid=uid, session_id=s, instance=inst, apps=apps)
                                              for s, inst, apps in sessions])


def test_messages_go_once_per_instance_holding_a_session_bound_to_the_app():
    messages = [msg(1, "u1"), msg(2, "u2"), msg(3, "u3"), msg(4, "u1")]
    users = [
        user("u1", ("s1", "room-A", ["a"]), ("s2", "room-A", ["a", "b"]), ("s3", "room-B", ["a"])),
        user("u2", ("s4", "room-B", ["b"])),   # bound to another app only
        user("u3"),                             # offline
    ]
    plan, online = plan_room_pushes(messages, users, "a")
    assert {k: [m.msg_id for m in v] for k, v in plan.items()} == {"room-A": [1, 4], "room-B": [1, 4]}
    assert online == 1


def test_nobody_online_means_no_room_calls():
    plan, online = plan_room_pushes([msg(1, "u1")], [user("u1")], "a")
    assert plan == {} and online == 0


def test_chunks_by_bytes_keeps_order_and_bounds():
    messages = [msg(i, "u", payload=b"x" * 100) for i in range(10)]
    size = message_size(messages[0])
    chunks = list(chunks_by_bytes(messages, size * 3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [m.msg_id for c in chunks for m in c] == list(range(10))
    # a message larger than the bound still travels, alone
    big = [msg(1, "u", payload=b"x" * 1000), msg(2, "u")]
    assert [len(c) for c in chunks_by_bytes(big, 200)] == [1, 1]
    assert list(chunks_by_bytes([], 100)) == []


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"),
    ("", "missing_api_key"),
    ("Basic abc", "missing_api_key"),
    ("Bearer", "missing_api_key"),
    ("Bearer " + "k" * 300, "invalid_api_key"),
    ("Bearer cl\u00e9", "invalid_api_key"),
])
def test_bearer_header_rejections(header, code):
    with pytest.raises(Unauthenticated) as err:
        bearer_key(header)
    assert err.value.code == code


def test_bearer_header_parsing():
    assert bearer_key("Bearer pk_abc") == "pk_abc"
    assert bearer_key("bearer   pk_abc ") == "pk_abc"


class AppsInMemory:
    """Stands in for AppRegistry's read side: a dict, no I/O."""

    def __init__(self, *apps: App) -> None:
        self.apps = {a.id: a for a in apps}

    async def by_id(self, app_id):
        return self.apps.get(app_id)

    async def by_api_key(self, key):
        return self.apps.get(key.removeprefix("key-"))


APP_A, APP_B = App("a", "sa"), App("b", "sb")


async def test_authentication_and_target_app():
    auth = Authenticator(AppsInMemory(APP_A, APP_B), "admin-key-123")
    assert await auth.authenticate("Bearer admin-key-123") == Principal(True, None)
    assert await auth.authenticate("Bearer key-a") == Principal(False, APP_A)
    with pytest.raises(Unauthenticated):
        await auth.authenticate("Bearer key-zzz")
    app_key = Principal(False, APP_A)
    admin = Principal(True, None)
    assert await auth.target_app(app_key, None) is APP_A
    assert await auth.target_app(app_key, "a") is APP_A
    with pytest.raises(Forbidden):
        await auth.target_app(app_key, "b")
    assert await auth.target_app(admin, "b") is APP_B
    with pytest.raises(InvalidRequest):
        await auth.target_app(admin, None)
    with pytest.raises(NotFound):
        await auth.target_app(admin, "nope")
    assert auth.app_filter(app_key, None) == "a" and auth.app_filter(admin, None) is None


async def test_admin_routes_need_the_admin_key():
    auth = Authenticator(AppsInMemory(APP_A), "admin-key-123")
    assert (await auth.authenticate_admin("Bearer admin-key-123")).admin
    with pytest.raises(Forbidden):
        await auth.authenticate_admin("Bearer key-a")
    with pytest.raises(Unauthenticated):
        await auth.authenticate_admin("Bearer wrong-admin")
    disabled = Authenticator(AppsInMemory(APP_A), "")
    with pytest.raises(Unauthenticated) as err:
        await disabled.authenticate_admin("Bearer ")
    assert err.value.code == "missing_api_key"
    with pytest.raises(Unauthenticated) as err:
        await disabled.authenticate_admin("Bearer anything")
    assert err.value.code == "admin_disabled"


def test_chunks_also_bounded_by_count():
    messages = [msg(i, "u") for i in range(25)]
    assert [len(c) for c in chunks_by_bytes(messages, 10**9, max_items=10)] == [10, 10, 5]


def test_in_flight_bytes_are_bounded_but_one_request_always_passes():
    from services.center.errors import Overloaded
    from services.center.push import PushService
    from services.center.ratelimit import RateLimiter
    from services.center.telemetry import Tally

    svc = PushService(ids=None, saver=None, register=None, rooms=None, limiter=RateLimiter(), tally=Tally(),
                      max_in_flight_bytes=100)
    with svc._in_flight(1000):          # larger than the bound, but alone
        with pytest.raises(Overloaded) as err:
            with svc._in_flight(1):
                pass
        assert err.value.retry_after_s == 1.0
    with svc._in_flight(60), svc._in_flight(40):
        assert svc._in_flight_bytes == 100
    assert svc._in_flight_bytes == 0 and svc.tally.overloaded == 1
