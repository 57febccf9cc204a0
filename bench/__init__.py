"""The qbo-daemon benchmark: ``python -m bench`` (see docs/performance.md)."""
