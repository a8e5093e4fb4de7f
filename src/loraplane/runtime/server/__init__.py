"""The HTTP face of the runtime: OpenAI, TGI/LoRAX and admin routes, health and metrics."""

from loraplane.runtime.server.app import create_app

__all__ = ["create_app"]
