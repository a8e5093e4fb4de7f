"""Kubernetes quantities to exact decimals and back, for rates kept as strings in the API."""

import re
from decimal import ROUND_HALF_UP, Decimal

from .base import QUANTITY

_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_SPLIT = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(.*)$")


def parse_quantity(text: str) -> Decimal:
    """The exact value of a non-negative quantity such as "2500m", "1.5", "16Gi" or "1e3"."""
    if not re.match(QUANTITY, text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity such as '2500m', '1.5' or '16Gi'")
    number, suffix = _SPLIT.match(text).groups()  # type: ignore[union-attr]
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return Decimal(number) * Decimal(10) ** int(suffix[1:])
    return Decimal(number) * _SUFFIX[suffix]


def to_milli(text: str) -> int:
    """A quantity in thousandths, rounded: "2.5" and "2500m" are both 2500."""
    return int((parse_quantity(text) * 1000).to_integral_value(ROUND_HALF_UP))


def format_milli(value: float | Decimal) -> str:
    """A rate as a quantity at milli precision: 12.0 is "12", 12.5 is "12500m", 0 is "0"."""
    milli = int((Decimal(str(value)) * 1000).to_integral_value(ROUND_HALF_UP))
    if milli < 0:
        raise ValueError(f"a rate cannot be negative, got {value}")
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"
