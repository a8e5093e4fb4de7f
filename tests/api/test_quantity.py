"""Quantities to exact values and rates back to quantities."""

from decimal import Decimal

import pytest

from loraplane.api import format_milli, parse_quantity, to_milli


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2500m", Decimal("2.5")),
        ("1.5", Decimal("1.5")),
        ("16Gi", Decimal(16 * 2**30)),
        ("1e3", Decimal(1000)),
        ("2k", Decimal(2000)),
        (".5", Decimal("0.5")),
        ("1E", Decimal(10**18)),
    ],
)
def test_parse(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5.5", "ten", "5 m"])
def test_parse_rejects(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_milli_round_trip():
    assert to_milli("2.5") == to_milli("2500m") == 2500
    assert format_milli(12) == "12"
    assert format_milli(12.5) == "12500m"
    assert format_milli(Decimal("0.0004")) == "0"
    assert format_milli(0.0005) == "1m"
    assert to_milli(format_milli(3.14159)) == 3142
    with pytest.raises(ValueError):
        format_milli(-1)
