"""The `lorafleet` command: the parser (main.py), one function per command (commands.py) and the
command groups (adapters, releases, submit, the HTTP client). Nothing of ours imports it but
its tests; it alone may reach up to train/, tune/ and serve/, lazily, inside each command."""
