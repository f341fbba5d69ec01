"""The fallback chat template: the tiny base's tokenizer carries it (vLLM's chat endpoint needs
one), and `format: chat` uses it when a tokenizer has no template of its own. BOS opens the
conversation when the tokenizer has one, as training's tokenization puts it there."""

CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
