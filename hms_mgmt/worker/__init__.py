"""Step services: the runtime (``runtime``), its outcome reporter, thread handlers, probes.

``python -m hms_mgmt.worker module:attribute`` serves a management object's handlers.
"""

from hms_mgmt.worker.runtime import Worker

__all__ = ("Worker",)
