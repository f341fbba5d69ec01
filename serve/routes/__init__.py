"""The ingress's HTTP routes, one module per API concern, each a FastAPI `router` (open to any
key) and an `admin` router (serve/auth.py's `require_admin` on every route): openai (models,
completions, chat), experiments (and feedback), releases, adapters, ui. serve/ingress.py mounts
them on the app and refuses to start if a route that changes the server is not admin. Route
functions run in an ingress replica and reach its state through `serve.auth.current()`; only
serve/ingress.py imports this package.
"""
