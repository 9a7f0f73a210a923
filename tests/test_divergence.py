"""Ranks that diverge (issue 16 item 2): inputs a parallelized model assumes identical are verified by
digest, gathered in the background and compared at the next attention call."""
import pytest
import torch
import torch.distributed as dist

import spattn
from dist_harness import run_on_ranks
from sp_cases import get_mesh

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _qwen_with_seed(same_seed: bool) -> str:
    from spattn.integrations.diffusers import parallelize
    from test_integration_diffusers import build, inputs

    model = build("qwen")
    mesh = get_mesh(2, 1)
    kw = inputs("qwen", seed=1 if same_seed else 1 + dist.get_rank())  # a user who forgot to share the seed
    handle = parallelize(model, mesh)
    try:
        with torch.no_grad():  # compared by a later attention call, by the next forward at the latest
            for _ in range(2):
                model(**kw)
        return "ok"
    except ValueError as e:
        return str(e)
    finally:
        handle.remove()


def test_diffusers_inputs_that_differ_are_an_error_on_every_rank():
    assert run_on_ranks(2, _qwen_with_seed, True) == "ok"
    msg = run_on_ranks(2, _qwen_with_seed, False)
    assert "differ across ranks: hidden_states, encoder_hidden_states" in msg and "seeded the same" in msg, msg


def _llm_with_rank_data(same: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from spattn.integrations.transformers import register, shard_inputs

    mesh = get_mesh(2, 1)
    register(mesh)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("spattn")
    g = torch.Generator().manual_seed(0 if same else dist.get_rank())
    ids = torch.randint(0, 64, (1, 16), generator=g)
    try:
        with torch.no_grad():  # one attention call per forward: compared by the next forward at the latest
            for _ in range(2):
                model(**shard_inputs(ids, mesh, labels=ids))
        return "ok"
    except ValueError as e:
        return str(e)


def test_llm_batches_that_differ_are_an_error_on_every_rank():
    assert run_on_ranks(2, _llm_with_rank_data, True) == "ok"
    msg = run_on_ranks(2, _llm_with_rank_data, False)
    assert "input_ids" in msg and "labels" in msg and "same full batch" in msg, msg


def _inputs_gather_is_async() -> list:
    mesh = spattn.init_mesh(ulysses_degree=2)
    x = torch.randn(1, 8, 4, 16, generator=torch.Generator().manual_seed(0))
    spattn.verify_identical(mesh, {"x": x})
    in_flight = len(mesh.check_state.pending)    # started, not waited for
    spattn.attention(x, x, x, mesh)                 # compared here (with this call's signature)
    return [in_flight, len(mesh.check_state.pending)]


def test_input_digests_are_gathered_in_the_background():
    assert run_on_ranks(2, _inputs_gather_is_async) == [1, 0]


def test_input_digest_sees_values_not_layout():
    """The digest of an input is a function of its dtype, shape and values: any strides (a timestep
    expanded from a scalar has stride 0), bf16 and bool included; one bit or a transpose changes it."""
    from spattn.check import _digest

    x = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    assert _digest((torch.tensor(0.5).expand(3),)) == _digest((torch.full((3,), 0.5),))
    assert _digest((torch.tensor(7).expand(1),)) == _digest((torch.tensor([7]),))  # size 1, stride 0
    assert _digest((x.transpose(0, 1).contiguous().transpose(0, 1),)) == _digest((x,))
    flipped = x.clone()
    flipped.view(torch.int32)[0, 0, 0] ^= 1  # the lowest bit of one element
    for other in (flipped, x.transpose(1, 2), x.reshape(8, 2, 4), x.double()):
        assert _digest((other,)) != _digest((x,))
    assert _digest((x.bfloat16(),)) == _digest((x.bfloat16().clone(),)) != _digest((x.half(),))
    assert _digest((x > 0,)) == _digest(((x > 0).clone(),))
