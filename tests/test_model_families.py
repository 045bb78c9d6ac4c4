"""Model families: tiny random Llama, Qwen2, Qwen3, Mistral, Gemma-2 and Phi-3 train a step; the
fused head applies what each model does to its logits (Gemma-2's soft-cap, Cohere's and Granite's
scales), checked against the model's own logits in float64; unsupported settings are refused with
one line before any weights are read."""
import pytest
import torch

from fasthint.batch import Sample, make_micro_batches
from fasthint.errors import ModelError
from fasthint.head import HeadTransform, head_transform
from fasthint.models import check_head, load_policy, resolve_attn_implementation
from fasthint.loss import micro_batch_logprobs

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def _config(family: str, vocab: int, pad: int, eos: int):
    import transformers as tf

    kw = dict(TINY, vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=8, **kw)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, **kw)
    if family == "cohere":
        return tf.CohereConfig(logit_scale=0.25, **kw)
    if family == "granite":
        return tf.GraniteConfig(logits_scaling=4.0, **kw)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "phi3": tf.Phi3Config}
    return cls[family](**kw)


def _save(tmp_path, family: str, head_gain: float = 1.0) -> str:
    """A random ``family`` model with the toy tokenizer, saved as a checkpoint directory; the head's
    weights multiplied by ``head_gain`` (large logits, where a soft-cap changes them)."""
    from transformers import AutoModelForCausalLM

    from fasthint.toy.model import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok.pad_token_id, tok.eos_token_id))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_gain)
    path = str(tmp_path / family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"]


@pytest.mark.parametrize("family", FAMILIES + ["cohere", "granite"])
def test_fused_head_logprobs_equal_the_models_own(tmp_path, family):
    """The loss's log-probs (hidden states -> fused head with the config's transform) equal
    log_softmax(model logits / T) computed by transformers, in float64, with logits large enough
    (head x 150) that Gemma-2's soft-cap at 30 changes them."""
    path = _save(tmp_path, family, head_gain=150.0)
    model, tok = load_policy(path, torch.device("cpu"), resolve_attn_implementation("auto", torch.device("cpu"),
                                                                                   _config_of(path)))
    model = model.double()
    assert check_head(model, tok) is None
    g = torch.Generator().manual_seed(1)
    prompt, completion = torch.randint(3, len(tok), (7,), generator=g), torch.randint(3, len(tok), (5,), generator=g)
    mb = make_micro_batches([Sample(prompt.tolist(), completion.tolist(), [0.0] * 5, 0.0)], 8, tok.pad_token_id,
                            torch.device("cpu"))[0]
    T = 0.7
    fused = micro_batch_logprobs(model, mb, T, autocast=False)
    with torch.no_grad():
        out = model(input_ids=torch.cat([prompt, completion])[None], output_hidden_states=True)
        raw = model.get_output_embeddings()(out.hidden_states[-1])[0, 6:11]  # lm_head alone
    logits = out.logits[0, 6:11]
    want = torch.log_softmax(logits / T, -1).gather(-1, completion[:, None]).squeeze(1)
    torch.testing.assert_close(fused.double(), want, atol=1e-5, rtol=1e-5)
    assert raw.abs().max() > 30  # the premise: logits where Gemma-2's soft-cap at 30 matters
    if family in ("gemma2", "cohere", "granite"):  # the transform changes the log-probs: not a no-op
        plain = torch.log_softmax(raw / T, -1).gather(-1, completion[:, None]).squeeze(1)
        assert (plain - want).abs().max() > 1e-2
    assert head_transform(model.config) == {"gemma2": HeadTransform(softcap=30.0), "cohere": HeadTransform(0.25),
                                            "granite": HeadTransform(0.25)}.get(family, HeadTransform())


def _config_of(path):
    from fasthint.models import load_model_config

    return load_model_config(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_a_step(tmp_path, family):
    import fasthint

    path = _save(tmp_path, family)
    cfg = fasthint.TrainConfig(model=path, max_steps=1, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_train_size=40, eval_data="", prompts_per_step=2, num_generations=4,
                               max_new_tokens=8, progress_bar=False, save_steps=0)
    res = fasthint.fit(cfg, reward_fn=lambda text, row: float(len(text) % 2))
    last = res["last"]
    # the gradient, not the loss: with zero-mean advantages and equal lengths (every completion cut at
    # max_new_tokens, as on some CPUs) the token-mean loss is exactly 0 while the update is not
    assert last["reward/std"] > 0 and last["grad_norm"] > 0
    assert all(v == v for v in (last["loss"], last["grad_norm"], last["entropy"]))  # finite, not NaN


def test_attention_the_model_lacks_is_refused_naming_the_flag(tmp_path):
    from fasthint.models import load_model_config

    config = load_model_config(_save(tmp_path, "gemma2"))
    assert resolve_attn_implementation("auto", torch.device("cpu"), config) == "eager"
    with pytest.raises(ModelError, match="--attn_implementation sdpa.*--attn_implementation auto"):
        resolve_attn_implementation("sdpa", torch.device("cpu"), config)
    qwen = load_model_config(_save(tmp_path, "qwen2"))
    assert resolve_attn_implementation("auto", torch.device("cpu"), qwen) == "sdpa"
    model, _ = load_policy(str(tmp_path / "gemma2"), torch.device("cpu"))  # the eval CLI's path: auto
    assert model.config._attn_implementation == "eager"


def test_unsupported_logit_transform_is_refused_from_the_config():
    import transformers as tf

    cfg = tf.LlamaConfig(**TINY)
    assert head_transform(cfg) == HeadTransform()
    cfg.logits_scaling = 2.0  # a field the head would silently ignore on a model type it does not know
    with pytest.raises(ModelError, match="config.logits_scaling = 2.0.*not supported"):
        head_transform(cfg)
    assert head_transform(tf.GraniteConfig(logits_scaling=4.0, **TINY)).scale == 0.25
    assert head_transform(tf.CohereConfig(logit_scale=0.5, **TINY)).loss_kwargs(1.0) == {"temperature": 2.0}
