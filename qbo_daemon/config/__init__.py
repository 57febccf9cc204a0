"""Configuration: one TOML loader into frozen dataclasses, values, secret sources, rendering."""
