"""``python -m hms_mgmt``: the ``hms`` command."""

from hms_mgmt.cli import run

run()
