"""One rank of the clean-exit check (tests/test_exit.py): an attn_implementation="spattn" forward (and
backward) on a tiny Llama over 2 gloo ranks, destroy_process_group, then a normal interpreter exit.

    python tests/exit_rank.py RANK WORLD PORT [ulysses_degree] [train]
"""
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int, ulysses: int, train: bool) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import spattn
    from spattn.integrations.transformers import register, shard_inputs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    mesh = spattn.init_mesh(ulysses_degree=ulysses, ring_degree=world // ulysses)
    register(mesh)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="spattn")
    ids = torch.randint(0, 64, (1, 29))
    if train:
        model(**shard_inputs(ids, mesh, labels=ids)).loss.backward()
    else:
        with torch.no_grad():
            model(**shard_inputs(ids, mesh))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1,
         len(sys.argv) > 5 and sys.argv[5] == "train")
