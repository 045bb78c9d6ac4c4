"""Each recipe's first training prompt, rendered as the trainer renders it, with a tiny tokenizer of the
recipe's model family: the paper's boxed instruction is there, and a hinted prompt uses SAGE's wording.

The tokenizers are built here (no download): the toy's vocabulary with a ChatML template that, as the
Qwen2.5 family's templates do, adds the family's own system turn when a chat has none (Qwen2.5-Math's
asks for a boxed answer, the others' does not)."""
import copy
import glob
import os

import pytest

from fasthint.config import parse_args
from fasthint.data import render_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAGE_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
HINT_SYSTEM = ("You are a helpful AI assistant. A conversation takes place between the User and the Assistant. The "
               "User asks a question, and the Assistant solves it. Please help me solve this question. Wrap only "
               "the final answer in \\boxed{}.")
# recipe -> (system text, user turn of the question "Q?") as the papers' code writes them (issue 30)
EXPECTED = {
    "sage_qwen2.5-7b-instruct.yaml": (SAGE_SYSTEM, "Q?"),
    "sage_light_qwen2.5-7b-instruct.yaml": (SAGE_SYSTEM, "Q?"),
    "hint_qwen2.5-7b.yaml": (HINT_SYSTEM, "Q?"),
    "guide_qwen2.5-math-7b.yaml": (SAGE_SYSTEM, "Problem: Q?"),
}
FAMILY_DEFAULT_SYSTEM = {"Qwen2.5-Math": "Please reason step by step, and put your final answer within \\boxed{}.",
                         "Qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n%s<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def family_tokenizer(model: str):
    from fasthint.toy.model import build_tokenizer

    family = next(f for f in FAMILY_DEFAULT_SYSTEM if f in model)
    tok = copy.deepcopy(build_tokenizer())
    tok.chat_template = CHATML.replace("%s", FAMILY_DEFAULT_SYSTEM[family])
    return tok


def test_every_recipe_is_checked():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))) == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_prompt_carries_its_papers_boxed_instruction(recipe):
    cfg = parse_args(["--config", os.path.join(ROOT, "recipes", recipe)])
    system, user = EXPECTED[recipe]
    tok = family_tokenizer(cfg.model)
    text = tok.decode(render_prompt(tok, "Q?", cfg.prompt_format), skip_special_tokens=False)
    hinted = tok.decode(render_prompt(tok, "Q?", cfg.prompt_format, hint="Add the parts."), skip_special_tokens=False)
    if cfg.chat_template == "none":  # a base model: plain text, the system text first
        assert text == f"{system}\n\n{user}"
        assert hinted == f"{system}\n\n{user}\n\nHere is a hint to help you:\nAdd the parts."
    else:
        assert text == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n" \
                       "<|im_start|>assistant\n"
        assert f"<|im_start|>user\n{user}\n\nHere is a hint to help you:\nAdd the parts.<|im_end|>" in hinted
    assert text.count("\\boxed{}") == 1


def test_toy_keeps_its_own_hint_wording_and_hint_template_is_an_option():
    from fasthint.errors import ConfigError
    from fasthint.toy.model import build_tokenizer

    tok = build_tokenizer()
    toy = parse_args([])
    assert toy.hint_template == "{question}\nHint: {hint}"
    assert "Q?\nHint: add<|im_end|>" in tok.decode(render_prompt(tok, "Q?", toy.prompt_format, hint="add"))
    own = parse_args(["--hint_template", "{question} (hint: {hint}) \\boxed{}"])
    assert "Q? (hint: add) \\boxed{}<|im_end|>" in tok.decode(render_prompt(tok, "Q?", own.prompt_format, hint="add"))
    with pytest.raises(ConfigError, match="--hint_template must contain {question} and {hint}"):
        parse_args(["--hint_template", "{question} only"])


def test_templates_keep_literal_braces():
    """A template asking for \\boxed{} renders (str.format would fail on its {}); braces in a question stay."""
    from fasthint.data import PromptFormat
    from fasthint.toy.model import build_tokenizer

    tok = build_tokenizer()
    fmt = PromptFormat(template="{question} Put the answer in \\boxed{}.")
    assert "Is {x} {hint}?\nHint: h Put the answer in \\boxed{}.<|im_end|>" in tok.decode(
        render_prompt(tok, "Is {x} {hint}?", fmt, hint="h"))
