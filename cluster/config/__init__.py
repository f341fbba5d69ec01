"""The YAML schemas: a job (job.py, sections.py), a serve file (serve.py), releases, Tune spaces,
loading with overrides and all-errors-at-once validation, and the generated reference.
Everything may import it; it imports only cluster.errors."""
