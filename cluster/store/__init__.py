"""The adapter store: storage URIs (local, s3://, gs://), immutable versions and the `current`
pointer, the on-storage layout, base fingerprints and what vLLM can serve.
Everything may import it; it imports only cluster.errors and cluster.config (the name rule)."""
