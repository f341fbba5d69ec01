"""The fallback chat template: the tiny base's tokenizer carries it (vLLM's chat endpoint needs
one), and `format: chat` uses it when a tokenizer has no template of its own. It is defined in
`cluster.text.prompt_format` beside the other prompt formats, where serving reads it too (an adapter
records the template it was trained with)."""

from cluster.text.prompt_format import CHAT_TEMPLATE, chat_template_for

__all__ = ["CHAT_TEMPLATE", "chat_template_for"]
