"""Engines: typed capability contracts (`protocol`), one engine per task (`registry`).

`load_engine(spec, home)` picks the engine by `spec.task`. Each engine owns its model and
implements the Protocols of its capabilities; none of them know about HTTP or Ray.
"""
