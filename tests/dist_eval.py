"""The no-hint evaluation (:func:`fasthint.eval.evaluate_accuracy`, greedy and sampled) over however
many ranks launched this script (``python tests/dist_eval.py OUT`` or ``torchrun --nproc_per_node=2
tests/dist_eval.py OUT``): the shipped toy, the HF engine, 48 held-out toy problems of all levels.
Rank 0 writes both evaluations, each rank's share of the prompts and whether the global RNG moved.
Used by tests/test_eval_sharded.py."""
import json
import re
import sys

import torch

from fasthint import dist
from fasthint.engines.hf import HFEngine
from fasthint.eval import evaluate_accuracy
from fasthint.models import load_policy
from fasthint.toy.model import shipped_toy
from fasthint.toy.task import make_splits


class Counting:
    """The engine, counting the prompts it is asked to sample."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, 0

    def generate(self, prompts, sampling):
        self.prompts += len(prompts)
        return self.engine.generate(prompts, sampling)


def reward(texts: list[str], rows: list[dict]) -> list[float]:
    """1 when the last boxed answer is the row's answer (the toy's format)."""
    out = []
    for t, r in zip(texts, rows):
        m = re.findall(r"\\boxed\{(-?\d+)\}", t)
        out.append(float(bool(m) and m[-1] == r["answer"]))
    return out


def main(out: str) -> None:
    dist.init()
    torch.manual_seed(1234 + dist.rank())
    model, tok = load_policy(shipped_toy(), torch.device("cpu"), attn_implementation="sdpa")
    _, rows = make_splits(0, 10, eval_per_level=12)
    engine = Counting(HFEngine(model, tok, batch_size=32))  # several generate chunks per rank
    rng = torch.get_rng_state()
    kw = dict(max_new_tokens=24, prompt_template="{question}")
    greedy = evaluate_accuracy(engine, tok, rows, reward, **kw)
    sampled = evaluate_accuracy(engine, tok, rows, reward, temperature=1.0, n=4, seed=3, **kw)
    moved = not torch.equal(rng, torch.get_rng_state())
    shares = dist.all_gather(engine.prompts)
    if dist.rank() == 0:
        with open(out, "w") as fh:
            json.dump({"greedy": greedy, "sampled": sampled, "shares": shares, "rng_moved": moved}, fh)
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
    dist.exit_process(0)
