"""Engines: what holds the records behind the actor (docs/architecture.md).

``base`` is the protocol the actor talks to; ``local`` keeps them in this process (the
pure ``state`` plus a ``store``: memory or ``sqlite``); ``redis`` in a shared task space.
"""
