"""The grant step service in plain pika: the wire format without hms_mgmt.

``python -m examples.pika_service`` (see README.md beside this file, and
``docs/wire-format.md``). It imports nothing of hms_mgmt, so it reads as a recipe for a
step service in any language with an AMQP 0-9-1 client and a JSON library.
"""
