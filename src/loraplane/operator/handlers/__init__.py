"""kopf registrations only: thin handlers that gather inputs and hand them to a Fleet."""

from . import adapters, fleets, startup

__all__ = ["adapters", "fleets", "startup"]
