"""Requests -> validated EngineRequests (see processor.py): the only way in for every front door."""

from vlserve.inputs.processor import InputProcessor

__all__ = ["InputProcessor"]
