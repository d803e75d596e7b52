"""Engines: one interface, one implementation per task.

`load_engine(spec, home)` picks the engine by `spec.task`. Each engine owns its model and
exposes async methods the Serve replica calls; none of them know about HTTP.
"""

from dify_serving.engines.base import Engine, EngineError, InputTooLong, load_engine

__all__ = ["Engine", "EngineError", "InputTooLong", "load_engine"]
