"""Loads checkpoint CKPT as training does, on however many ranks launched this script
(``python tests/dist_load.py CKPT OUT`` or ``torchrun --nproc_per_node=2 tests/dist_load.py CKPT OUT``):
under torchrun only rank 0 reads the weights and the others start from the meta device. Rank 0 writes
every rank's logits of a fixed input (whole model gathered) to OUT.json and the full state dict to
OUT.safetensors. Used by tests/test_distributed.py."""
import json
import sys

import torch

from fasthint import dist
from fasthint.models import load_trainable_policy


def main(ckpt: str, out: str) -> None:
    device = dist.init()
    policy, tok = load_trainable_policy(ckpt, device)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 2]], device=device)
    with dist.gathered(policy), torch.no_grad():
        logits = policy.lm(input_ids=ids).logits[0].double().tolist()
    sd = dist.full_state_dict(policy)
    every = dist.all_gather(logits)
    if dist.rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, out + ".safetensors")
        with open(out + ".json", "w") as fh:
            json.dump(every, fh)
    dist.barrier()  # as the trainer does before closing: no rank tears gloo down while another writes
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.exit_process(0)  # as torchrun -m fasthint.train ends
