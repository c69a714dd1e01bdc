"""The wire format: what travels on the bus, cut by message kind.

``codec`` (JSON and its limits), ``fields`` (checks for decoders), ``steps`` (step
messages), ``outcomes`` (what step services report), ``requests`` (client requests and
the engine's replies). The broker names are in :mod:`hms_mgmt.topology`; the reference
for other runtimes is in ``docs/wire-format.md``.
"""
