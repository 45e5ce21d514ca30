"""The hardening suite's long runs (``make soak``, ``make fuzz``) and the helpers its tests share.

``support`` holds what both the short CI tests (``tests/test_hardening_*.py``) and the
long runs need: a scriptable raw TCP upstream, a sidecar run as a real process with
its log captured, and readings of a process's memory and descriptors from ``/proc``.
"""
