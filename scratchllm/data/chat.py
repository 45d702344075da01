"""Instruction and chat templates: render a conversation to ids and a loss mask, batch, pack.

Two named templates (TEMPLATES):

- `alpaca`: the book's chapter-7 prompt text (`formats.alpaca_text`), one user instruction
  (and optional input) and one response, ended by <|endoftext|>.
- `chat`: multi-turn. Every turn is `<|role|>` + "\\n" + content + `<|end|>`, turns concatenated
  with nothing between them; role is system, user or assistant, and each marker is one special
  token. A generation prompt ends with `<|assistant|>\\n`; the reply ends at `<|end|>`.

`render` encodes the pieces between special tokens separately (exactly as Hugging Face's
`apply_chat_template` does with added tokens, so `hf_chat_template` gives the same ids) and
returns the mask beside the ids: True = the model learns to predict that token. By default
only assistant contents and their end token are learned; `train_on_prompt=True` learns all.
Message contents are plain text: a special token's name inside them is encoded as characters.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from scratchllm.data.formats import alpaca_text
from scratchllm.errors import UserError
from scratchllm.model import IGNORE_INDEX

if TYPE_CHECKING:
    from torch import Tensor

    from scratchllm.tokenizer.base import BaseTokenizer

ENDOFTEXT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")
CHAT_END = "<|end|>"
CHAT_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", CHAT_END)

Message = Mapping[str, Any]
Example = tuple[list[int], list[bool]]  # ids and loss mask, as render returns them


class Segment(NamedTuple):
    """A piece of a rendered conversation: text or one special token, learned or not."""

    text: str
    special: bool
    learned: bool


@dataclass(frozen=True)
class Template:
    """A named prompt format: its special tokens, end-of-turn token and segmenter."""

    name: str
    special_tokens: tuple[str, ...]
    end_token: str

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
        """The conversation as segments (the generation prompt appended if asked)."""
        if self.name == "alpaca":
            return _alpaca_segments(messages, add_generation_prompt)
        return _chat_segments(messages, add_generation_prompt)


TEMPLATES: dict[str, Template] = {
    "alpaca": Template("alpaca", (ENDOFTEXT,), ENDOFTEXT),
    "chat": Template("chat", CHAT_SPECIALS, CHAT_END),
}


def get_template(name: str) -> Template:
    """The template called `name`; a one-line UserError with the nearest name otherwise."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    close = difflib.get_close_matches(name, list(TEMPLATES), n=1, cutoff=0.4)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown template {name!r}{hint}: choose one of {', '.join(TEMPLATES)}")


# ---- conversations ---------------------------------------------------------------------------


def to_messages(example: Message | Sequence[Message]) -> list[dict[str, str]]:
    """An OpenAI-style message list from a conversation, {"messages": [...]} or Alpaca record."""
    if isinstance(example, Mapping):
        if "messages" in example:
            return to_messages(example["messages"])
        missing = [k for k in ("instruction", "output") if k not in example]
        if missing:
            raise UserError(f"instruction record is missing field(s) {', '.join(missing)}: "
                            "give 'instruction', optional 'input', and 'output'")
        record = {k: example.get(k, "") for k in ("instruction", "input", "output")}
        for key, value in record.items():
            if not isinstance(value, str):
                raise UserError(f"instruction record field {key!r} must be a string, "
                                f"got {type(value).__name__}")
        user = record["instruction"]
        if record["input"]:
            user += "\n\n" + record["input"]
        return [{"role": "user", "content": user, "instruction": record["instruction"],
                 "input": record["input"]},
                {"role": "assistant", "content": record["output"]}]
    if isinstance(example, str) or not isinstance(example, Sequence):
        raise UserError(f"a conversation must be a list of messages, got {type(example).__name__}")
    messages = []
    for i, message in enumerate(example):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise UserError(f"message {i} must have 'role' and 'content' fields, got {message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"message {i} has unknown role {role!r}: use one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"message {i} content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise UserError(f"message {i} is a system message: only the first may be one")
        messages.append(dict(message))
    return messages


def _check_response(i: int, content: str) -> None:
    if not content.strip():
        raise UserError(f"message {i} is an empty assistant response: drop the example or "
                        "give it a response")


def _alpaca_segments(messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
    roles = [m["role"] for m in messages]
    want = ["user"] if add_generation_prompt else ["user", "assistant"]
    if roles != want:
        raise UserError(f"the alpaca template takes one {' + '.join(want)} exchange, got roles "
                        f"{roles}: use the chat template for other conversations")
    user = messages[0]
    instruction = user.get("instruction", user["content"])
    prompt = alpaca_text(instruction, user.get("input", ""), "")
    segments = [Segment(prompt, False, False)]
    if not add_generation_prompt:
        _check_response(1, messages[1]["content"])
        segments += [Segment(messages[1]["content"], False, True), Segment(ENDOFTEXT, True, True)]
    return segments


def _chat_segments(messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
    segments = []
    for i, message in enumerate(messages):
        learned = message["role"] == "assistant"
        if learned:
            _check_response(i, message["content"])
        segments += [Segment(f"<|{message['role']}|>", True, False),
                     Segment("\n" + message["content"], False, learned),
                     Segment(CHAT_END, True, learned)]
    if add_generation_prompt:
        segments += [Segment("<|assistant|>", True, False), Segment("\n", False, False)]
    return segments


# ---- rendering -------------------------------------------------------------------------------


def render(template: Template | str, example: Message | Sequence[Message],
           tokenizer: BaseTokenizer, train_on_prompt: bool = False,
           max_length: int | None = None) -> Example:
    """(ids, mask) of a conversation or Alpaca record; mask True = a learned token."""
    template = get_template(template) if isinstance(template, str) else template
    messages = to_messages(example)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant message: nothing to learn")
    ids, mask = _encode(template, template.segments(messages, False), tokenizer, train_on_prompt)
    if max_length is not None and len(ids) > max_length:
        raise UserError(f"a conversation of {len(ids)} tokens is longer than the maximum "
                        f"{max_length}: shorten it, drop it, or raise the context length")
    return ids, mask


def render_prompt(template: Template | str, example: Message | Sequence[Message],
                  tokenizer: BaseTokenizer) -> list[int]:
    """The ids that prompt the model for the next assistant reply (history plus its header)."""
    template = get_template(template) if isinstance(template, str) else template
    messages = to_messages(example)
    if isinstance(example, Mapping) and "instruction" in example:
        messages = messages[:-1]  # an Alpaca record's own output is the answer to predict
    return _encode(template, template.segments(messages, True), tokenizer, False)[0]


def _encode(template: Template, segments: list[Segment], tokenizer: BaseTokenizer,
            train_on_prompt: bool) -> Example:
    missing = [t for t in template.special_tokens if t not in tokenizer.special_tokens]
    if missing:
        raise UserError(f"the tokenizer lacks the {template.name} template's special tokens "
                        f"{missing}: add them with ensure_special_tokens (and grow the model)")
    ids: list[int] = []
    mask: list[bool] = []
    for seg in segments:
        piece = [tokenizer.special_tokens[seg.text]] if seg.special else \
            tokenizer.encode_ordinary(seg.text)
        ids += piece
        mask += [seg.learned or train_on_prompt] * len(piece)
    return ids, mask


def ensure_special_tokens(tokenizer: BaseTokenizer, tokens: Sequence[str]) -> BaseTokenizer:
    """The tokenizer with `tokens` appended as special tokens where missing (new ids at the end)."""
    missing = [t for t in dict.fromkeys(tokens) if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    data = tokenizer.to_dict()
    specials = dict(data["special_tokens"])
    for i, token in enumerate(missing):
        specials[token] = tokenizer.vocab_size + i  # special ids follow the last id, no gaps
    data["special_tokens"] = specials
    return type(tokenizer).from_dict(data)


# ---- batches ---------------------------------------------------------------------------------


def shift(ids: Sequence[int], mask: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Next-token inputs and targets of one example; an unlearned target is IGNORE_INDEX."""
    targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
    return list(ids[:-1]), targets


def pad_sft_batch(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """inputs and targets (B, L), padded to the longest example; padding targets are ignored."""
    import torch

    if not examples:
        raise UserError("an empty batch: give at least one example")
    pairs = [shift(ids, mask) for ids, mask in examples]
    L = max(len(x) for x, _ in pairs)
    if L == 0:
        raise UserError("every example in the batch is a single token: nothing to predict")
    inputs = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), L), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


class Packed(NamedTuple):
    """Packed windows, each (N, window): padding slots have doc_ids -1 and ignored targets."""

    inputs: Tensor
    targets: Tensor
    doc_ids: Tensor  # which example of its window each slot holds (0, 1, ...; -1 = padding)
    positions: Tensor  # position within that example, restarting at 0 per example


def pack(examples: Sequence[Example], window: int, pad_id: int = 0) -> Packed:
    """Pack examples in order into windows of `window` input tokens (a new window when full)."""
    import torch

    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for i, (ids, mask) in enumerate(examples):
        x, y = shift(ids, mask)
        if len(x) > window:
            raise UserError(f"example {i} has {len(ids)} tokens, more than a packing window of "
                            f"{window} + 1: raise the window or drop the example")
        if used + len(x) > window:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    shape = (len(rows), window)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, (x, y) in enumerate(row):
            end = start + len(x)
            inputs[r, start:end] = torch.tensor(x, dtype=torch.long)
            targets[r, start:end] = torch.tensor(y, dtype=torch.long)
            doc_ids[r, start:end] = d
            positions[r, start:end] = torch.arange(len(x))
            start = end
    return Packed(inputs, targets, doc_ids, positions)


def document_mask(doc_ids: Tensor) -> Tensor:
    """(N, 1, W, W) boolean attention mask: a query sees earlier keys of its own document only.

    Causality is included, so the kernel runs with causal=False (or True: the same result).
    Padding slots (-1) form one more document, so no row is fully masked (no NaN).
    """
    import torch

    W = doc_ids.shape[-1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (N, W, W)
    causal = torch.ones(W, W, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal).unsqueeze(1)


# ---- Hugging Face ----------------------------------------------------------------------------


def hf_chat_template(template_name: str = "chat") -> str:
    """A Jinja chat_template for tokenizer_config.json giving exactly `render`'s ids."""
    template = get_template(template_name)
    if template.name != "chat":
        raise UserError(f"only the chat template has a Hugging Face chat_template, not "
                        f"{template.name!r}")
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('unknown role ' + message['role']) }}{%- endif -%}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    )
