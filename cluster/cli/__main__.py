"""`python -m cluster.cli ...`: the `lorafleet` command (how `lorafleet submit` starts jobs)."""

from cluster.cli.main import entry

entry()
