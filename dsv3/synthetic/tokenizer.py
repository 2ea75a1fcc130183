"""A small byte-level BPE tokenizer with DeepSeek's special tokens and a DeepSeek-style chat template.

Trained in a few milliseconds on a fixed text, so the demo checkpoint is reproducible offline.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>",  # id 0 = bos_token_id
    "<｜end▁of▁sentence｜>",  # id 1 = eos_token_id
    "<｜▁pad▁｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    # tool calls and their results, as DeepSeek-V3 writes them (dsv3/serve/tools.py)
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]

# An assistant turn that called tools writes the calls as DeepSeek-V3 does; consecutive tool results sit in one
# outputs block, closed before the next turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set after_tool = loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'tool' %}"
    "{% if after_tool and m['role'] != 'tool' %}<｜tool▁outputs▁end｜>{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<｜Assistant｜>{{ m['content'] or '' }}"
    "<｜tool▁calls▁begin｜>"
    "{% for c in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<｜tool▁call▁begin｜>{{ c['type'] }}<｜tool▁sep｜>{{ c['function']['name'] }}"
    "{{ '\\n```json\\n' }}{{ c['function']['arguments'] }}{{ '\\n```' }}<｜tool▁call▁end｜>{% endfor %}"
    "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}{% if not after_tool %}<｜tool▁outputs▁begin｜>{% endif %}"
    "<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if messages[-1]['role'] == 'tool' %}<｜tool▁outputs▁end｜>{% endif %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

CORPUS = """
DeepSeek-V3 is a strong Mixture-of-Experts language model with 671B total parameters, of which
37B are activated for each token. It adopts Multi-head Latent Attention and the DeepSeekMoE
architecture, an auxiliary-loss-free strategy for load balancing and a multi-token prediction
training objective. The model was pre-trained on 14.8 trillion diverse, high-quality tokens,
followed by supervised fine-tuning and reinforcement learning. Hello world! How are you today?
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ' "
def main(): print("hello") # code, text, numbers, and the letters of the alphabet.
"""


def write_tokenizer(dst: str | Path, vocab_size: int) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    dst = Path(dst)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": SPECIAL_TOKENS[2],
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False))
    return tok.get_vocab_size(with_added_tokens=True)
