"""RESP packing of the lean pipeline (no network)."""

import pytest

from services.common.redis_scripts import pack


def test_pack_matches_resp():
    assert pack([("SET", "k", b"v\r\n")]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"


def test_pack_numbers_and_unicode():
    assert pack([("ZRANGE", "ü", 0, -1), ("X", 1.5, True)]) == (
        b"*4\r\n$6\r\nZRANGE\r\n$2\r\n\xc3\xbc\r\n$1\r\n0\r\n$2\r\n-1\r\n"
        b"*3\r\n$1\r\nX\r\n$3\r\n1.5\r\n$1\r\n1\r\n")


def test_pack_rejects_other_types():
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])
