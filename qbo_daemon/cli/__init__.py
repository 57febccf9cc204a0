"""The ``qbo-daemon`` command line: commands, the management client, rendering, demo."""
