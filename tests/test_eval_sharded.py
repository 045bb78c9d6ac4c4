"""Evaluation sharded over ranks with per-prompt seeds (issue 28): every rank samples its share of
the prompts, the figures are gathered, and 2 ranks give exactly the figures of 1 rank; seeded
draws follow the sampling distribution, do not depend on the batch and leave the global RNG alone."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from fasthint.data import render_prompt
from fasthint.engines.base import SamplingConfig, completion_seed
from fasthint.engines.hf import HFEngine, _sample, _uniforms

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "kernels")]), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_seeded_draws_follow_the_sampling_distribution(top_p):
    """40,000 rows of one distribution at temperature 0.8, each row its own seed: the frequencies
    match the float64 (nucleus-renormalised) probabilities within 5 standard errors; a token outside
    the nucleus is never drawn; the log-probs are the sampling ones."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 9, generator=g, dtype=torch.float64) * 1.5
    rows = 40_000
    sp = SamplingConfig(temperature=0.8, top_p=top_p)
    seeds = np.array([completion_seed(7, j) for j in range(rows)], dtype=np.uint64)
    tok, lp = _sample(logits.float().expand(rows, -1), sp, _uniforms(seeds, 3))
    p = torch.softmax(logits[0] / 0.8, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[(p[order].cumsum(0) - p[order]) < top_p]] = True
    want = torch.where(keep, p, 0.0) / p[keep].sum()
    freq = torch.bincount(tok, minlength=9).double() / rows
    se = (want * (1 - want) / rows).sqrt()
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)
    assert (freq[~keep] == 0).all()
    torch.testing.assert_close(lp.double(), torch.log(p)[tok], atol=1e-6, rtol=0)


def test_uniforms_depend_on_seed_and_step_only():
    seeds = np.array([completion_seed(s, j) for s in range(50) for j in range(4)], dtype=np.uint64)
    u = _uniforms(seeds, 5)
    assert u.min() >= 0 and u.max() < 1 and len(set(u.tolist())) == len(u)
    np.testing.assert_array_equal(_uniforms(seeds[::-1].copy(), 5), u[::-1])
    assert not np.array_equal(_uniforms(seeds, 6), u)


@pytest.fixture(scope="module")
def toy():
    from fasthint.models import load_policy
    from fasthint.toy.model import shipped_toy

    return load_policy(shipped_toy(), torch.device("cpu"), attn_implementation="sdpa")


def test_seeded_completions_do_not_depend_on_the_batch(toy):
    """A prompt's seeded completions are the same alone, at another position, in another chunk of the
    engine's batch and among prompts of other lengths (other left padding); the global RNG is left
    as it was; unseeded sampling does use it."""
    model, tok = toy
    qs = ["3+4=?", "12+7-5+9=?", "8-2+6=?", "45*12+31-70=?"]
    prompts = [render_prompt(tok, q) for q in qs]
    engine = HFEngine(model, tok, batch_size=6)  # 2 prompts x 3 completions per chunk

    def sampled(idx):
        sp = SamplingConfig(n=3, temperature=1.0, max_new_tokens=16, seeds=[100 + i for i in idx])
        comps = engine.generate([prompts[i] for i in idx], sp)
        return {(idx[c.prompt_index], k % 3): c.token_ids for k, c in enumerate(comps)}

    state = torch.get_rng_state()
    together = sampled([0, 1, 2, 3])
    assert torch.equal(state, torch.get_rng_state())
    for idx in ([3], [2, 0], [3, 1, 0]):
        alone = sampled(idx)
        assert alone == {k: together[k] for k in alone}
    assert len({tuple(v) for v in together.values()}) > 6  # the draws are not all one
    engine.generate(prompts[:1], SamplingConfig(n=2, temperature=1.0, max_new_tokens=4))
    assert not torch.equal(state, torch.get_rng_state())


def test_seeds_must_match_the_prompts(toy):
    model, tok = toy
    with pytest.raises(ValueError, match="one seed per prompt"):
        HFEngine(model, tok).generate([[1, 2]], SamplingConfig(seeds=[1, 2]))


@pytest.mark.slow
def test_two_ranks_evaluate_their_shares_and_equal_one_rank(tmp_path):
    """The shipped toy evaluated (greedy, and 4 samples per prompt) by 1 process and by 2 ranks under
    torchrun: each rank samples half of the 48 prompts (before, every rank sampled them all), the
    figures are exactly equal, and evaluation leaves the training RNG where it was."""
    script = os.path.join(REPO, "tests", "dist_eval.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd in ([sys.executable, script, str(one)], torchrun + [script, str(two)]):
        res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.load(open(one)), json.load(open(two))
    assert a["shares"] == [2 * 48] and b["shares"] == [2 * 24, 2 * 24]  # greedy + sampled calls
    assert a["greedy"] == b["greedy"] and a["sampled"] == b["sampled"]
    assert a["sampled"]["eval/num_prompts"] == 48 and 0 < a["sampled"]["eval/pass@4"] < 1
    assert not a["rng_moved"] and not b["rng_moved"]
