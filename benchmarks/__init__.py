"""Performance benchmarks of pytest-ditredundancy (scripts, not tests): ``python -m benchmarks.capture``."""
