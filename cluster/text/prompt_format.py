"""The prompt format an adapter was trained in, recorded beside its weights (`prompt_format` in
a version's lorafleet.json) so that serving renders requests to it exactly as training rendered
rows. Training writes the record (`record`); the server reads it once per version
(`Recorded.from_meta`) and renders chat and completion requests with it. Both sides take the
format definitions from here: the alpaca prompt templates and the fallback chat template.

    data format   /v1/chat/completions                      /v1/completions (text prompts)
    chat          the conversation, recorded chat template  the prompt as sent (BOS as training)
    alpaca        alpaca prompt, instruction = the          alpaca prompt, instruction = the
                  system and user messages                  prompt
    completion    the system and user messages, raw         the prompt as sent (BOS as training)
    text          the system and user messages, raw         the prompt as sent (BOS as training)

"The system and user messages" are their contents, in order, joined by a blank line. A
conversation with earlier assistant (or tool) turns cannot be written in a single-turn format:
it is refused rather than silently cut. BOS goes first when training put it first: training
prepends the tokenizer's BOS to an example that does not already start with it, and so does the
server. Token-id prompts go to the engine as sent. No tokenizer is needed here: training passes
its own in (`record`), and the engine tokenizes what the server renders.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import LorafleetError

SCHEMA = 1
DATA_FORMATS = ("alpaca", "chat", "completion", "text")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# The fallback chat template: `format: chat` uses it when the tokenizer has no template of its
# own, and the tiny base's tokenizer carries it (vLLM's chat endpoint needs one). BOS opens the
# conversation when the tokenizer has one, as training's tokenization puts it there.
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# what the server sends a chat request to a single-turn adapter with: one message holding the
# prompt it rendered itself, which this template passes to the engine unchanged
PASSTHROUGH_TEMPLATE = "{{ messages[0]['content'] }}"
PROMPT_ROLES = ("system", "developer", "user")  # the roles whose text makes a prompt
PROMPT_SEPARATOR = "\n\n"


class PromptFormatError(LorafleetError, ValueError):
    """A request that cannot be written in the prompt format its adapter was trained in."""


def alpaca_prompt(instruction: str, inp: str = "", prompt=ALPACA_PROMPT, with_input=None) -> str:
    """The alpaca prompt for one row, up to where the response starts."""
    if inp.strip():
        return (with_input or ALPACA_PROMPT_WITH_INPUT).format(instruction=instruction, input=inp)
    return prompt.format(instruction=instruction, input=inp)


def chat_template_for(tokenizer) -> tuple[str, str]:
    """(the chat template `format: chat` renders with, where it came from): the tokenizer's own
    ("tokenizer"), else the fallback ("fallback")."""
    own = getattr(tokenizer, "chat_template", None)
    return (own, "tokenizer") if isinstance(own, str) and own else (CHAT_TEMPLATE, "fallback")


def prepends_bos(text: str, tokenizer) -> bool:
    """Whether training's tokenization puts BOS before an example whose first segment is
    `text` (train/data.py `tokenize_segments`): the tokenizer has one and `text` lacks it."""
    bos = tokenizer.bos_token
    return tokenizer.bos_token_id is not None and not text.startswith(bos or "\0")


def record(data_format: str, tokenizer, train_on_prompt: bool, **extra) -> dict:
    """What training writes as a version's `prompt_format`: the data format, its template, the
    chat template actually used, BOS/EOS as training put them, and train_on_prompt."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {DATA_FORMATS}")
    rec = {
        "schema": SCHEMA,
        "data_format": data_format,
        "train_on_prompt": bool(train_on_prompt),
        "bos_token": tokenizer.bos_token if tokenizer.bos_token_id is not None else None,
        "eos_token": tokenizer.eos_token,  # training ends every response with it
        "bos_prepended": prepends_bos("", tokenizer),
        "template": None,
        "chat_template": None,
        "chat_template_source": None,
    }
    if data_format == "alpaca":
        rec["template"] = {"prompt": ALPACA_PROMPT, "prompt_with_input": ALPACA_PROMPT_WITH_INPUT}
    if data_format == "chat":
        template, source = chat_template_for(tokenizer)
        opening = _opening(tokenizer, template)
        rec |= {
            "chat_template": template,
            "chat_template_source": source,
            "bos_prepended": prepends_bos(opening, tokenizer),
            # whether training's examples began with BOS at all (the template may write it):
            # a completion prompt to this adapter gets it too
            "bos_first": rec["bos_token"] is not None
            and (prepends_bos(opening, tokenizer) or opening.startswith(rec["bos_token"])),
        }
    return rec | extra


def _opening(tokenizer, template: str) -> str:
    """How `template` starts a conversation (whether it writes BOS itself); "" for a template
    that refuses a lone user message (training's rows then showed whether it does)."""
    try:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # a template's own raise_exception(): a publish must not fail on it
        return ""


def conversation_text(messages) -> str:
    """A single-turn prompt from a chat conversation: the contents of its system and user
    messages, in order, joined by a blank line. PromptFormatError for assistant or tool turns
    and for content that is not text."""
    parts = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if role not in PROMPT_ROLES:
            raise PromptFormatError(
                f"messages[{i}]: role {role!r}: this adapter was trained on single-turn rows, so "
                f"a conversation is written as one prompt from its {'/'.join(PROMPT_ROLES)} "
                "messages; send earlier turns inside a user message, or use /v1/completions"
            )
        parts.append(_text(content, i))
    if not parts:
        raise PromptFormatError("messages: expected at least one system or user message")
    return PROMPT_SEPARATOR.join(parts)


def _text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise PromptFormatError(
                f"messages[{i}].content: this adapter was trained on text; got a {kind!r} part"
            )
        texts.append(part["text"])
    return "\n".join(texts)  # as vLLM joins the text parts of one message


@dataclass(frozen=True)
class Recorded:
    """A version's recorded prompt format, as the server applies it."""

    data_format: str
    bos_token: str | None
    bos_prepended: bool
    bos_first: bool = False
    prompt: str = ALPACA_PROMPT
    prompt_with_input: str = ALPACA_PROMPT_WITH_INPUT
    chat_template: str | None = None

    @classmethod
    def from_meta(cls, pf) -> Recorded | None:
        """The record in a version's lorafleet.json, or None where there is none that this
        server reads (published before formats were recorded, or malformed): such a version is
        served as the base model's requests are."""
        if not isinstance(pf, dict) or pf.get("schema") != SCHEMA:
            return None
        fmt, bos = pf.get("data_format"), pf.get("bos_token")
        template = pf.get("template") or {}
        chat = pf.get("chat_template")
        ok = (
            fmt in DATA_FORMATS
            and (bos is None or isinstance(bos, str))
            and isinstance(template, dict)
            and all(isinstance(template.get(k, ""), str) for k in ("prompt", "prompt_with_input"))
            and (fmt != "chat" or (isinstance(chat, str) and chat))
        )
        if not ok:
            return None
        return cls(
            data_format=fmt,
            bos_token=bos,
            bos_prepended=bool(pf.get("bos_prepended")) and bos is not None,
            bos_first=bool(pf.get("bos_first", pf.get("bos_prepended"))) and bos is not None,
            prompt=template.get("prompt") or ALPACA_PROMPT,
            prompt_with_input=template.get("prompt_with_input") or ALPACA_PROMPT_WITH_INPUT,
            chat_template=chat if fmt == "chat" else None,
        )

    def with_bos(self, text: str) -> str:
        """`text` with BOS first, where training would have put it there."""
        if self.bos_prepended and not text.startswith(self.bos_token):
            return self.bos_token + text
        return text

    def text_prompt(self, text: str) -> str:
        """A completion request's text prompt as training saw the same prompt: the alpaca prompt
        with `text` as the instruction, or `text` as it is; BOS as training put it (for a chat
        adapter: BOS first when training's conversations began with it, whoever wrote it)."""
        if self.data_format == "alpaca":
            text = alpaca_prompt(text, "", self.prompt, self.prompt_with_input)
        if self.data_format == "chat":
            if self.bos_first and not text.startswith(self.bos_token):
                return self.bos_token + text
            return text
        return self.with_bos(text)

    def completion_prompt(self, prompt):
        """The `prompt` field of a completion request, rendered: each text prompt through
        `text_prompt`; token ids as sent."""
        if isinstance(prompt, str):
            return self.text_prompt(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.text_prompt(p) for p in prompt]
        return prompt

    def serving_chat_template(self) -> str:
        """The chat template the engine renders a chat request to this adapter with: the
        recorded one (BOS first where training added it), or the pass-through of a prompt the
        server rendered itself (`chat_messages`)."""
        if self.data_format != "chat":
            return PASSTHROUGH_TEMPLATE
        return ("{{ bos_token }}" if self.bos_prepended else "") + self.chat_template

    def chat_messages(self, messages):
        """The messages a chat request sends the engine: as sent for a chat adapter; else one
        message holding the single-turn prompt rendered from them (`conversation_text`)."""
        if self.data_format == "chat":
            return messages
        return [{"role": "user", "content": self.text_prompt(conversation_text(messages))}]
