"""The running daemon: wiring, lifecycle, systemd, logs, webhooks."""
