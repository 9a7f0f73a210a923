"""Hugging Face LLMs sequence-parallel through spattn.integrations.transformers: per-rank logits
gathered, the token-weighted loss and the all-reduced parameter gradients equal the single-process
model's (tiny random configs built from configs, GQA, odd lengths, every factorization, both layouts)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from dist_harness import run_on_ranks

pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_config(family: str):
    import transformers

    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[family]
    if not hasattr(transformers, cls):
        return None
    return getattr(transformers, cls)(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def sp_llm_case(u: int, r: int, families, seqs, layouts):
    """Per (family, seq, layout): max relative errors of logits, loss and gradients vs one process."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import spattn
    from spattn.integrations.transformers import global_loss, reduce_gradients, register, shard_inputs

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    register(mesh)
    errs = {}
    for fam in families:
        cfg = tiny_config(fam)
        if cfg is None:
            continue
        torch.manual_seed(0)  # the same weights and tokens on every rank
        ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        sp = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="spattn", dtype=torch.float32)
        sp.load_state_dict(ref.state_dict())  # (a model's config is shared with set_attn_implementation)
        for S in seqs:
            ids = torch.randint(0, cfg.vocab_size, (2, S))
            labels = ids.clone()
            labels[1, :5] = -100  # ignored targets count nowhere
            ref.zero_grad()
            out_ref = ref(input_ids=ids, labels=labels, use_cache=False)
            out_ref.loss.backward()
            for layout in layouts:
                sp.zero_grad()
                inputs = shard_inputs(ids, mesh, labels=labels, layout=layout)
                out = sp(**inputs)
                out.loss.backward()
                reduce_gradients(sp, mesh)
                logits = spattn.gather(out.logits, mesh, seq_len=S, layout=layout)
                loss = global_loss(out.loss, mesh)
                gerr = max(_rel(p.grad, q.grad) for p, q in zip(sp.parameters(), ref.parameters()))
                errs[(fam, S, layout)] = (_rel(logits, out_ref.logits), _rel(loss, out_ref.loss.detach()), gerr)
    dist.barrier()
    return errs


@pytest.mark.parametrize("world,u", [(2, 2), (2, 1), (4, 4), (4, 2), (4, 1)])
def test_llm_matches_single_process(world, u):
    seqs = (37,) if world == 2 else (61,)
    errs = run_on_ranks(world, sp_llm_case, u, world // u, FAMILIES, seqs, ("zigzag", "contiguous"), timeout=600)
    assert {k[0] for k in errs} >= {"llama", "qwen2"}
    for key, (e_logits, e_loss, e_grad) in errs.items():
        assert e_logits <= 1e-5, (key, e_logits)
        assert e_loss <= 1e-5, (key, e_loss)
        assert e_grad <= 1e-5, (key, e_grad)
