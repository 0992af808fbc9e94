"""Helpers of the evaluation tests: the config evaluate.py sees, and real judge models with a known behaviour.

save_letter_judge: the embedded tiny GPT-NeoX with its weights set so that, whatever the prompt, it answers one
letter and stops. With every block's attention and MLP output projections at zero, each block adds nothing to the
residual stream (GPT-NeoX's parallel residual: h + attn(ln1(h)) + mlp(ln2(h)), both zero), so the final hidden
state at a position is the final layer norm of its token's embedding, and the output layer alone decides the next
token from the current one: a bigram model. Its rows are set to map the last token of the chat template's
generation prompt (':' of 'assistant:') to the letter, and the letter to EOS; every other row is zero.
"""
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from helpers import ROOT

# The role-per-line template of tests/conftest.py: the generation prompt ends with ':'.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_letter_judge(directory: Path, letter: str, cache_root: Path) -> Path:
    """A Hugging Face model directory (weights, byte tokenizer, chat template) whose greedy answer to any chat
    prompt is `letter` followed by EOS."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM
    from models import materialize_embedded_model
    source = materialize_embedded_model('embedded:tiny', cache_root)
    model = GPTNeoXForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for linear in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                linear.weight.zero_()
                linear.bias.zero_()
        norm = model.gpt_neox.final_layer_norm
        head = model.get_output_embeddings().weight
        head.zero_()
        colon, answer = (tokenizer.convert_tokens_to_ids(t) for t in (':', letter))
        for current, following in ((colon, answer), (answer, tokenizer.eos_token_id)):
            hidden = norm(model.gpt_neox.embed_in.weight[current])
            head[following] += 50 * hidden / hidden.norm() ** 2  # logit 50 for `following`, near 0 for the rest
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_reward_model(directory: Path, num_labels: int = 1) -> Path:
    """A small GPT-NeoX sequence-classification model (random weights, seed 0) with the byte tokenizer: a real
    reward model whose scores are unknown but fixed, for checking how judges.RewardModelScorer runs one."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification
    from models import build_byte_tokenizer
    tokenizer = build_byte_tokenizer()
    config = GPTNeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPTNeoXForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def eval_config(overrides, tmp_path):
    """The config `python evaluate.py OVERRIDES` sees, with caches under tmp_path."""
    with initialize_config_dir(config_dir=str(ROOT / 'config' / 'evaluate'), version_base=None):
        return compose(config_name='evaluate', overrides=[f'local_dirs=[{tmp_path}]', *overrides])
