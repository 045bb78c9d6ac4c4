"""Prompt formats: a system prompt, the hint after the question or in the system turn, plain text
for base models (--chat_template none) and keyword arguments for the chat template."""
import pytest

from fasthint.config import TrainConfig
from fasthint.data import PromptFormat, render_prompt
from fasthint.errors import ConfigError
from fasthint.toy.model import build_tokenizer


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_system_prompt_and_hint_positions():
    tok = build_tokenizer()
    q = "1+1=?"
    plain = _text(tok, render_prompt(tok, q))
    assert "system" not in plain and q in plain
    with_sys = _text(tok, render_prompt(tok, q, PromptFormat(system_prompt="Be brief.")))
    assert with_sys == _text(tok, tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], add_generation_prompt=True,
        tokenize=True, return_dict=False))
    in_question = _text(tok, render_prompt(tok, q, PromptFormat(), hint="add"))
    assert f"{q}\nHint: add" in in_question
    in_system = _text(tok, render_prompt(tok, q, PromptFormat(system_prompt="Be brief.", hint_position="system"),
                                         hint="add"))
    sys_turn, user_turn = in_system.split(q)[0], in_system.split(q)[1]
    assert "Be brief.\n\nHint: add" in sys_turn and "Hint" not in user_turn


def test_plain_text_for_base_models_and_template_kwargs():
    tok = build_tokenizer()
    fmt = PromptFormat(template="Q: {question}\nA:", system_prompt="Solve it.", chat_template="none")
    ids = render_prompt(tok, "2+2=?", fmt)
    assert ids == tok("Solve it.\n\nQ: 2+2=?\nA:", add_special_tokens=True)["input_ids"]
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}")
    assert _text(tok, render_prompt(tok, "x", PromptFormat())).endswith("x")
    assert _text(tok, render_prompt(tok, "x", PromptFormat(chat_template_kwargs='{"enable_thinking": false}'))
                 ).endswith("x[no-think]")


@pytest.mark.parametrize("kw,match", [({"chat_template_kwargs": "{bad"}, "--chat_template_kwargs must be a JSON"),
                                      ({"chat_template_kwargs": "[1]"}, "--chat_template_kwargs must be a JSON"),
                                      ({"chat_template": "raw"}, "--chat_template"),
                                      ({"hint_position": "end"}, "--hint_position")])
def test_bad_prompt_settings_name_the_flag(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw).validate()


@pytest.mark.parametrize("kwargs", ["{bad", "[1]", '{"tokenize": false}'])
def test_eval_checks_the_prompt_format_before_loading(kwargs):
    """python -m fasthint.eval shares training's prompt checks (one line, before any model is loaded); the
    keys fasthint passes to apply_chat_template itself are refused."""
    from fasthint.eval import EvalConfig

    with pytest.raises(ConfigError, match="--chat_template_kwargs"):
        EvalConfig(data="x", chat_template_kwargs=kwargs).validate()
    with pytest.raises(ConfigError, match="--chat_template_kwargs"):
        TrainConfig(chat_template_kwargs=kwargs).validate()


def test_training_prompts_use_the_format(tmp_path):
    from fasthint.data import Rows
    from fasthint.preflight import render_prompts

    tok = build_tokenizer()
    cfg = TrainConfig(system_prompt="Be brief.", prompt_template="{question} Answer in a box.").validate()
    rows = Rows([{"uid": "0", "question": "3+4=?", "answer": "7"}])
    rows.skipped, rows.total = [], 1
    _, prompts = render_prompts(cfg, tok, rows, "d")
    assert prompts["0"] == render_prompt(tok, "3+4=?", PromptFormat("{question} Answer in a box.", "Be brief."))
    assert "Be brief." in _text(tok, prompts["0"])
