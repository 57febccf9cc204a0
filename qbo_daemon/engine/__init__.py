"""The refresh policy: scheduler, refresher, token service, connect flow, account operations."""
