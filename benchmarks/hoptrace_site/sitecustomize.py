"""Loaded by every Python process started with this folder on PYTHONPATH (benchmarks/hoptrace.py
puts it there for the engine daemon and the step service): installs the hop tracer."""

import os

if os.environ.get("HOPTRACE_DIR"):
    from benchmarks.hoptrace import install

    install()
