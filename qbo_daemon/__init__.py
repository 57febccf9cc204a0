"""qbo-daemon: keeps QuickBooks Online OAuth 2.0 tokens fresh, on time and encrypted."""

__version__ = "0.1.0"
