"""The Intuit stand-in used by tests, ``qbo-daemon demo`` and the benchmark."""
