"""gid encoding and parsing, including gids this library did not make."""

from __future__ import annotations

import uuid

import pytest

from coordinator import Gid, InvalidGid
from coordinator.gid import (
    GID_PREFIX,
    MAX_GID_BYTES,
    check_identifier,
    parse,
    transactional_id,
)

TXID = "0123456789abcdef0123456789abcdef"
LOG = "00aa11bb22cc"
GOOD = f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID}"

MAX_NAME = "N" + "n" * 47
MAX_INSTANCE = "I" + "i.-_" * 11 + "abc"


def test_max_identifiers_are_48_chars() -> None:
    assert len(MAX_NAME) == 48
    assert len(MAX_INSTANCE) == 48
    check_identifier(MAX_NAME, "name")
    check_identifier(MAX_INSTANCE, "instance")
    with pytest.raises(ValueError):
        check_identifier(MAX_NAME + "x", "name")


def test_parse_good() -> None:
    g = parse(GOOD)
    assert g == Gid("orders", "host-1", 3, 5, 7, LOG, TXID)
    assert g.transactional_id == "pk2pc.orders:host-1:3"
    assert str(g) == GOOD


@pytest.mark.parametrize(
    ("name", "instance", "slot", "partition"),
    [
        ("orders", "host-1", 0, 0),
        ("a", "b", 1, 1),
        ("Orders.V2", "pod_7.zone-a", 42, 17),
        (MAX_NAME, MAX_INSTANCE, 9999, 99999),
    ],
)
def test_round_trip(name: str, instance: str, slot: int, partition: int) -> None:
    g = Gid.new(name, instance, slot, partition, 2**63 - 1, LOG)
    text = str(g)
    assert text.startswith(f"{GID_PREFIX}:")
    assert parse(text) == g
    assert len(text.encode()) <= MAX_GID_BYTES
    assert g.transactional_id == transactional_id(name, instance, slot)


def test_max_length_gid_fits_postgres() -> None:
    g = Gid.new(MAX_NAME, MAX_INSTANCE, 9999, 99999, 2**63 - 1, "f" * 12)
    assert len(str(g).encode("utf-8")) <= 199
    assert MAX_GID_BYTES == 199


def test_new_gids_are_unique() -> None:
    gids = {str(Gid.new("orders", "h", 0, 0, 0, LOG)) for _ in range(1000)}
    assert len(gids) == 1000


def test_transactional_id_stable_and_distinct() -> None:
    assert transactional_id("orders", "a", 0) == transactional_id("orders", "a", 0)
    assert transactional_id("orders", "a", 0).startswith("pk2pc.")  # one ACL prefix
    ids = {transactional_id(n, i, s) for n in ("o", "p") for i in ("a", "b") for s in (0, 1)}
    assert len(ids) == 8


def test_transactional_id_is_unambiguous() -> None:
    # Identifiers may contain '.', '-' and '_': no two (name, instance, slot) may share
    # a transactional.id, or two services would fence each other's producers.
    assert transactional_id("a.b", "c", 0) != transactional_id("a", "b.c", 0)
    assert transactional_id("a", "b.1", 2) != transactional_id("a", "b", 12)
    parts = ["a", "b", "a.b", "b.c", "a.b.c", "1", "a-b", "a_b", "b-1", "c.0"]
    seen: dict[str, tuple[str, str, int]] = {}
    for name in parts:
        for instance in parts:
            for slot in (0, 1, 10):
                tid = transactional_id(name, instance, slot)
                assert seen.setdefault(tid, (name, instance, slot)) == (name, instance, slot)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slot", -1),
        ("slot", 10000),
        ("partition", -1),
        ("partition", 100000),
        ("floor", -1),
        ("floor", 2**63),
        ("log", LOG.upper()),
        ("log", LOG[:-1]),
        ("log", LOG + "0"),
        ("txid", TXID.upper()),
        ("txid", TXID[:-1]),
        ("txid", TXID + "0"),
        ("txid", TXID + "\n"),
        ("name", ""),
        ("name", "a:b"),
        ("name", "-a"),
        ("name", "é"),
        ("instance", "a b"),
        ("instance", "x" * 49),
    ],
)
def test_gid_constructor_validates(field: str, value: object) -> None:
    kwargs: dict[str, object] = {
        "name": "orders", "instance": "h", "slot": 0, "partition": 0, "floor": 0,
        "log": LOG, "txid": TXID,
    }
    kwargs[field] = value
    with pytest.raises(ValueError):
        Gid(**kwargs)  # type: ignore[arg-type]


HOSTILE = {
    "empty": "",
    "other_prefix": f"pk2pc1:orders:host-1:3:5:{TXID}",
    "prefix_only": "pk2pc2",
    "prefix_colon": "pk2pc2:",
    "uppercase_prefix": f"PK2PC2:orders:host-1:3:5:7:{LOG}:{TXID}",
    "foreign_app": "my-app-transaction-1",
    "psycopg_xa": "42_Z3RyaWQ=_YnF1YWw=",
    "psycopg_xa_real": "1_Z3RyaWQ=_YnF1YWw=",
    "extra_field": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID}:extra",
    "missing_field": f"pk2pc2:orders:3:5:7:{LOG}:{TXID}",
    "colon_injection_name": f"pk2pc2:ord:ers:host-1:3:5:7:{LOG}:{TXID}",
    "colon_injection_instance": f"pk2pc2:orders:host:1:3:5:7:{LOG}:{TXID}",
    "empty_name": f"pk2pc2::host-1:3:5:7:{LOG}:{TXID}",
    "empty_instance": f"pk2pc2:orders::3:5:7:{LOG}:{TXID}",
    "uppercase_hex": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID.upper()}",
    "mixed_case_hex": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID[:31]}A",
    "short_txid": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID[:31]}",
    "long_txid": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID}0",
    "uuid_with_dashes": f"pk2pc2:orders:host-1:3:5:{uuid.UUID(TXID)}",
    "leading_zero_slot": f"pk2pc2:orders:host-1:03:5:7:{LOG}:{TXID}",
    "leading_zero_partition": f"pk2pc2:orders:host-1:3:05:7:{LOG}:{TXID}",
    "double_zero": f"pk2pc2:orders:host-1:00:5:7:{LOG}:{TXID}",
    "negative_slot": f"pk2pc2:orders:host-1:-3:5:7:{LOG}:{TXID}",
    "plus_slot": f"pk2pc2:orders:host-1:+3:5:7:{LOG}:{TXID}",
    "slot_too_big": f"pk2pc2:orders:host-1:10000:5:7:{LOG}:{TXID}",
    "partition_too_big": f"pk2pc2:orders:host-1:3:100000:7:{LOG}:{TXID}",
    "unicode_digit_slot": f"pk2pc2:orders:host-1:\u0663:5:7:{LOG}:{TXID}",
    "fullwidth_digit": f"pk2pc2:orders:host-1:\uff13:5:7:{LOG}:{TXID}",
    "unicode_name": f"pk2pc2:ordérs:host-1:3:5:7:{LOG}:{TXID}",
    "unicode_hex": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID[:31]}\u0663",
    "name_starts_with_dot": f"pk2pc2:.orders:host-1:3:5:7:{LOG}:{TXID}",
    "name_too_long": f"pk2pc2:{'n' * 49}:host-1:3:5:7:{LOG}:{TXID}",
    "very_long": "pk2pc2:" + "a" * 10_000,
    "very_long_valid_shape": f"pk2pc2:{'n' * 48}:{'i' * 48}:3:5:7:{LOG}:{TXID}" + "0" * 200,
    "single_quote": f"pk2pc2:orders':host-1:3:5:7:{LOG}:{TXID}",
    "sql_injection": f"pk2pc2:orders:host-1:3:5:7:{LOG}:{TXID}'; DROP TABLE x; --",
    "double_quote": f'pk2pc2:"orders":host-1:3:5:7:{LOG}:{TXID}',
    "backslash": f"pk2pc2:orders\\:host-1:3:5:7:{LOG}:{TXID}",
    "trailing_newline": GOOD + "\n",
    "leading_newline": "\n" + GOOD,
    "embedded_newline": f"pk2pc2:orders\n:host-1:3:5:7:{LOG}:{TXID}",
    "trailing_space": GOOD + " ",
    "leading_space": " " + GOOD,
    "nul": GOOD + "\x00",
    "tab": f"pk2pc2:orders\t:host-1:3:5:7:{LOG}:{TXID}",
    "missing_log": f"pk2pc2:orders:host-1:3:5:7:{TXID}",
    "missing_floor": f"pk2pc2:orders:host-1:3:5:{LOG}:{TXID}",
    "leading_zero_floor": f"pk2pc2:orders:host-1:3:5:07:{LOG}:{TXID}",
    "negative_floor": f"pk2pc2:orders:host-1:3:5:-7:{LOG}:{TXID}",
    "floor_too_long": f"pk2pc2:orders:host-1:3:5:{'9' * 20}:{LOG}:{TXID}",
    "uppercase_log": f"pk2pc2:orders:host-1:3:5:7:{LOG.upper()}:{TXID}",
    "short_log": f"pk2pc2:orders:host-1:3:5:7:{LOG[:-1]}:{TXID}",
    "surrogate": f"pk2pc2:orders\udcff:host-1:3:5:7:{LOG}:{TXID}",
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_parse_rejects_foreign_gids(text: str) -> None:
    with pytest.raises(InvalidGid):
        parse(text)


@pytest.mark.parametrize("value", [None, 42, GOOD.encode()])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidGid):
        parse(value)  # type: ignore[arg-type]


def test_invalid_gid_is_value_error_and_message_is_bounded() -> None:
    with pytest.raises(ValueError) as info:
        parse("x" * 10_000)
    assert isinstance(info.value, InvalidGid)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "value",
    ["", "-x", ".x", "_x", "a:b", "a b", "a'b", 'a"b', "a\nb", "x\n", "é", "a/b", "a" * 49],
)
def test_check_identifier_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        check_identifier(value, "name")


@pytest.mark.parametrize("value", ["a", "A1", "orders", "pod-7", "x.y_z", "9"])
def test_check_identifier_accepts(value: str) -> None:
    assert check_identifier(value, "name") == value
