"""Text rules that training and serving must apply identically: prompt formats (how a request
becomes the tokens an adapter was trained on) and answer scoring (exact match).
train/ and serve/ import it; it imports only cluster.errors."""
