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
from spattn.testing import rel_err

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




def sp_llm_case(u: int, r: int, families, seqs, layouts):
    """Per (family, seq, layout): max relative errors of logits, loss and gradients vs one process."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import spattn
    from spattn.integrations.transformers import global_loss, reduce_gradients, register, shard_inputs, sp_loss

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
                # sp_loss from the logits is the same rank share as transformers' loss with num_items_in_batch
                share_err = rel_err(sp_loss(out.logits, inputs["labels"], mesh), out.loss)
                assert share_err <= 1e-6, (fam, S, layout, share_err)
                gerr = max(rel_err(p.grad, q.grad) for p, q in zip(sp.parameters(), ref.parameters()))
                errs[(fam, S, layout)] = (rel_err(logits, out_ref.logits), rel_err(loss, out_ref.loss.detach()), gerr)
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


def padded_case(u: int, r: int, layouts):
    """Right- and left-padded rows in one batch, via shard_inputs(attention_mask=...): logits at the real
    tokens, loss and gradients vs SDPA on the padded batch with the padding mask."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import spattn
    from spattn.integrations.transformers import global_loss, reduce_gradients, register, shard_inputs

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    register(mesh)
    cfg = tiny_config("llama")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    sp = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="spattn", dtype=torch.float32)
    sp.load_state_dict(ref.state_dict())
    S = 23
    ids = torch.randint(0, cfg.vocab_size, (4, S))
    mask = torch.ones(4, S, dtype=torch.long)
    mask[0, 15:] = 0      # right padding
    mask[1, :9] = 0       # left padding
    mask[3, :2] = 0       # left padding, one token
    labels = ids.clone()
    # the reference's targets: real tokens only, and no row's first real token (nothing real precedes it)
    first = mask.bool() & ~torch.nn.functional.pad(mask.bool(), (1, 0))[:, :-1]
    ref_labels = labels.masked_fill(~mask.bool() | first, -100)
    ref.zero_grad()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=ref_labels, use_cache=False)
    out_ref.loss.backward()
    errs = {}
    for layout in layouts:
        sp.zero_grad()
        inputs = shard_inputs(ids, mesh, labels=labels, attention_mask=mask, layout=layout)
        out = sp(**inputs)
        out.loss.backward()
        reduce_gradients(sp, mesh)
        T = int(mask.sum())
        logits = spattn.gather(out.logits, mesh, seq_len=T, layout=layout, cu_seqlens=inputs["spattn_cu_seqlens"])
        gerr = max(rel_err(p.grad, q.grad) for p, q in zip(sp.parameters(), ref.parameters()))
        errs[layout] = (rel_err(logits[0], out_ref.logits[mask.bool()]), rel_err(global_loss(out.loss, mesh), out_ref.loss),
                        gerr)
    dist.barrier()
    return errs


@pytest.mark.parametrize("u,r", [(1, 2), (2, 1)], ids=["u1r2", "u2r1"])
def test_padded_batch_matches_sdpa(u, r):
    """HF padded batches (right and left padding in one batch) equal SDPA with the padding mask."""
    for layout, errs in run_on_ranks(u * r, padded_case, u, r, ("zigzag", "balanced"), timeout=600).items():
        assert max(errs) <= 1e-5, (layout, errs)


def compiled_llm_case(u: int, r: int, S: int, layout: str):
    """Max relative errors (logits, loss, grads) of the compiled (fullgraph) spattn Llama vs eager spattn."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import spattn
    from spattn.integrations.transformers import register, shard_inputs

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
    register(mesh)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="spattn", dtype=torch.float32)
    ids = torch.randint(0, 128, (2, S))
    inputs = shard_inputs(ids, mesh, labels=ids, layout=layout)

    def run(fn):
        model.zero_grad()
        out = fn(**inputs)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    l0, loss0, g0 = run(model)
    torch._dynamo.reset()
    l1, loss1, g1 = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    dist.barrier()
    return rel_err(l1, l0), rel_err(loss1, loss0), max(rel_err(a, b) for a, b in zip(g1, g0))


def test_compiled_llm_matches_eager():
    """torch.compile(fullgraph=True) of a Llama using attn_implementation="spattn": same numbers."""
    for err in run_on_ranks(2, compiled_llm_case, 1, 2, 37, "zigzag", timeout=600):
        assert err <= 1e-6, err


# -- single process: inputs, errors, optional import -------------------------------------------------
def test_shard_inputs_mesh_of_one():
    import spattn
    from spattn.integrations.transformers import shard_inputs

    ids = torch.arange(10).view(2, 5)
    labels = ids.clone()
    labels[0, 2] = -100
    got = shard_inputs(ids, spattn.SPMesh(), labels=labels, layout="contiguous")
    assert torch.equal(got["input_ids"], ids)
    assert torch.equal(got["position_ids"], torch.arange(5).expand(2, 5))
    want = torch.tensor([[1, -100, 3, 4, -100], [6, 7, 8, 9, -100]])  # shifted, last target ignored
    assert torch.equal(got["labels"], want) and torch.equal(got["shift_labels"], want)
    # zigzag on one rank: 2 chunks of 3, so one padded slot: token 0, next global position, label -100
    zz = shard_inputs(ids, spattn.SPMesh(), labels=labels, layout="zigzag")
    assert torch.equal(zz["input_ids"][:, :5], ids) and (zz["input_ids"][:, 5] == 0).all()
    assert torch.equal(zz["position_ids"], torch.arange(6).expand(2, 6))
    assert torch.equal(zz["labels"][:, :5], want) and (zz["labels"][:, 5] == -100).all()
    assert got["num_items_in_batch"] == 7 and got["spattn_seq_len"] == 5 and got["use_cache"] is False


def test_unsupported_inputs_raise_clearly():
    from transformers import AutoModelForCausalLM

    import spattn
    from spattn.integrations.transformers import register, shard_inputs

    register(spattn.SPMesh(), name="spattn_one")
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="spattn_one")
    ids = torch.randint(0, 128, (2, 7))
    inputs = shard_inputs(ids, spattn.SPMesh())
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, -2:] = 0
    with pytest.raises(NotImplementedError, match="shard_inputs.*attention_mask=attention_mask"):
        model(**inputs, attention_mask=mask)
    with pytest.raises(ValueError, match="spattn_seq_len"):
        model(input_ids=ids, use_cache=False)
    out = model(**inputs, attention_mask=torch.ones(2, 7, dtype=torch.long))  # an all-ones mask is fine
    ref = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(out.logits[:, :7], ref(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_generate_says_what_to_do_and_the_advice_works():
    """model.generate() with attn_implementation="spattn" raises an error about generation and the KV
    cache, whose advice (switch to sdpa for generation, back to spattn to train) gives the reference tokens."""
    from transformers import AutoModelForCausalLM

    import spattn
    from spattn.integrations.transformers import register, shard_inputs

    register(spattn.SPMesh(), name="spattn_gen")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="spattn_gen")
    ref = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (1, 6))
    with pytest.raises(ValueError, match=r"(?s)generate\(\).*KV-cache.*set_attn_implementation\('sdpa'\)"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False),
                       ref.generate(ids, max_new_tokens=3, do_sample=False))
    model.set_attn_implementation("spattn_gen")
    got = model(**shard_inputs(ids, spattn.SPMesh(), layout="contiguous")).logits
    torch.testing.assert_close(got, ref(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_import_spattn_does_not_import_transformers():
    code = "import sys, spattn, spattn.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
