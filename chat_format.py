"""The chat template's side of preference data: messages rendered through a tokenizer's template, its end-of-turn
token, and the HH dialogue format turned into messages and back.

    from chat_format import render_chat, hh_messages
    prompt, response = render_chat(tokenizer, [{'role': 'user', 'content': 'Hi'}], [{'role': 'assistant', 'content': 'Hello'}])
    hh_messages('\n\nHuman: Hi\n\nAssistant:')     # [{'role': 'user', 'content': 'Hi'}]

data_sources.py reads the sources and calls these for conversational rows and render_hh_with_chat_template=true
(data_sources.render_hh_as_chat).
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

from utils import ASSISTANT, HUMAN

Messages = List[Dict[str, str]]  # a dialogue: [{'role': 'user', 'content': 'Hi'}, ...]


def render_chat(tokenizer, prompt: list, completion: list) -> Union[Tuple[str, str], str]:
    """(prompt text ending with the generation prompt, completion text) from the chat template, or why not."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        return 'the chat template renders the prompt differently inside the whole conversation'
    return prompt_text, full_text[len(prompt_text):]


def special_token_texts(tokenizer) -> List[str]:
    decoder = getattr(tokenizer, 'added_tokens_decoder', {})
    return sorted({*tokenizer.all_special_tokens, *(t.content for t in decoder.values() if t.special)})


def closed_turn(response: str, special_texts: Sequence[str]) -> Optional[str]:
    """A chat-rendered response up to and including the special token that closes it, or None if it ends
    with none: 'Paris.<|im_end|>\n' -> 'Paris.<|im_end|>' (SmolLM2), 'Paris.' -> None.

    The whitespace after the end-of-turn token separates turns (the next '<|im_start|>' follows it); the
    model never has to produce it, since generation stops at the end-of-turn token."""
    stripped = response.rstrip()
    return stripped if any(stripped.endswith(s) for s in special_texts) else None


def end_of_turn_token_id(tokenizer) -> Optional[int]:
    """The token id that closes an assistant turn in the tokenizer's chat template (SmolLM2: <|im_end|>, 2),
    None if the template closes it with no special token."""
    rendered = render_chat(tokenizer, [{'role': 'user', 'content': 'Hi'}], [{'role': 'assistant', 'content': 'Hello'}])
    closed = None if isinstance(rendered, str) else closed_turn(rendered[1], special_token_texts(tokenizer))
    if closed is None:
        return None
    return tokenizer.convert_tokens_to_ids(next(s for s in special_token_texts(tokenizer) if closed.endswith(s)))


_HH_TURN = re.compile(r'(\n\nHuman:|\n\nAssistant:)')


def hh_messages(prompt: str) -> List[Dict[str, str]]:
    """The messages of an HH-format prompt: '\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:' ->
    [user A, assistant B, user C] (each text stripped; the final empty Assistant turn is the one to answer)."""
    parts = _HH_TURN.split(prompt)[1:]  # marker, text, marker, text, ...
    roles = {HUMAN: 'user', ASSISTANT: 'assistant'}
    messages = [{'role': roles[marker], 'content': text.strip()} for marker, text in zip(parts[::2], parts[1::2])]
    return messages[:-1]


def hh_text(messages: Messages) -> str:
    """The HH-format prompt of a dialogue, the inverse of hh_messages: [user A, assistant B, user C] ->
    '\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:'. HH has no system turn: a system message is
    written as a '\n\nSystem:' paragraph in its place (before the first Human turn, usually)."""
    markers = {'user': HUMAN, 'assistant': ASSISTANT, 'system': '\n\nSystem:'}
    return ''.join(f'{markers.get(m["role"], HUMAN)} {m["content"]}' for m in messages) + ASSISTANT
