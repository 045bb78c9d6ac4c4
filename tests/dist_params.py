"""``fasthint.dist.full_parameters`` on however many ranks launched this script (``torchrun
--nproc_per_node=2 tests/dist_params.py OUT BF16``): the toy policy sharded with FSDP2 (``BF16`` 1:
bf16 mixed precision) streams its weights as the vLLM engine receives them, cast to bf16; rank 0
writes them to OUT.safetensors and, to OUT.json, the most FSDP units found whole at any point of the
stream. Used by tests/test_distributed.py."""
import json
import sys

import torch
from torch.distributed.tensor import DTensor

from fasthint import dist
from fasthint.loss import PolicyLoss
from fasthint.toy.model import build_model, build_tokenizer


def main(out: str, bf16: bool) -> None:
    dist.init()
    policy = PolicyLoss(build_model(build_tokenizer(), seed=0))
    dist.shard(policy, bf16=bf16)
    layers = getattr(policy.lm, policy.lm.base_model_prefix).layers
    streamed, order, most_whole = {}, [], 0
    for name, t in dist.full_parameters(policy.lm, torch.bfloat16):
        whole = sum(not isinstance(p, DTensor) for layer in layers for p in layer.parameters()) // \
            max(1, len(list(layers[0].parameters())))
        most_whole = max(most_whole, whole)
        streamed[name] = t.clone()
        order.append(name)
    if dist.rank() == 0:
        from safetensors.torch import save_file

        save_file(streamed, out + ".safetensors")
        with open(out + ".json", "w") as fh:
            json.dump({"most_whole_layers": most_whole, "order": order}, fh)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
    dist.exit_process(0)  # as torchrun -m fasthint.train ends
