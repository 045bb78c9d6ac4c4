"""recipes/*.yaml: each loads, validates with the papers' values and builds a run (data, model,
engine, rewards, algorithm, optimiser) with a tiny random model of the same architecture in place
of the checkpoint (no download)."""
import glob
import json
import os

import pytest
import yaml

from conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml")))
ARCH = {"Qwen/Qwen2.5-7B-Instruct": "qwen2", "Qwen/Qwen2.5-7B": "qwen2", "Qwen/Qwen2.5-Math-7B": "qwen2"}


def _tiny_model(path, arch: str) -> str:
    import torch
    import transformers

    from fasthint.toy.model import build_tokenizer

    tok = build_tokenizer()
    cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    cfg = cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=False,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_there_are_the_four_recipes():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"sage_qwen2.5-7b-instruct.yaml", "sage_light_qwen2.5-7b-instruct.yaml", "hint_qwen2.5-7b.yaml",
            "guide_qwen2.5-math-7b.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_builds_a_run_with_a_tiny_model_of_its_architecture(path, tmp_path):
    from fasthint import dist
    from fasthint.build import build
    from fasthint.config import parse_args

    recipe = yaml.safe_load(open(path))
    model = _tiny_model(tmp_path / "model", ARCH[recipe["model"]])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=?", "answer": str(i + 1), "solution": f"It is {i + 1}.",
                                        "hint": ["add", "add one", f"{i}+1"]}) + "\n" for i in range(6)))
    cfg = parse_args(["--config", path, "--model", model, "--data", str(data), "--eval_data", "",
                      "--engine", "hf",  # vLLM is not installed in the main test environment
                      "--output_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c")])
    for key, value in recipe.items():  # every value of the recipe reached the config, except the two swapped
        if key not in ("model", "engine"):
            assert getattr(cfg, key) == value, key
    run = build(cfg, None)
    try:
        assert type(run.policy.lm).__name__ == ("Qwen2ForCausalLM" if ARCH[recipe["model"]] == "qwen2"
                                                else "LlamaForCausalLM")
        assert type(run.algo).name == recipe["algo"] and len(run.rows) == 6
    finally:
        run.engine.close()
        run.close_scorer()
        dist.close()


def test_the_papers_clip_and_off_policyness():
    """Issue 30: Guide clips its unhinted completions symmetrically at 0.2 (verl's clip_ratio; fasthint's
    default eps_high is DAPO's 0.28), and HINT takes 2 optimizer steps per rollout batch, so that its
    AAPO weights act."""
    from fasthint.config import parse_args

    guide = parse_args(["--config", os.path.join(REPO, "recipes", "guide_qwen2.5-math-7b.yaml")])
    assert guide.eps_low == guide.eps_high == 0.2
    hint = parse_args(["--config", os.path.join(REPO, "recipes", "hint_qwen2.5-7b.yaml")])
    assert hint.steps_per_generation == 2 and hint.prompts_per_step == 128 and hint.aapo_lambda == 1.0
