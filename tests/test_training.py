"""Training over SP ranks the ways people do it (a plain loop with the documented call, DDP, FSDP2's
``fully_shard``, accelerate, HF ``Trainer``) gives the single-process gradient of every trainable
parameter: inside the parallelized model, in a module feeding it (a text adapter, ControlNet-style
residuals) and in a head after it; with data parallelism around the mesh too (4 ranks = DP2 x SP2,
where the reference is the mean over the two DP batches of the single-process gradients).

Every rank builds the same models from a seed and computes the single-process reference itself.
"""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import spattn  # noqa: E402
from spattn.integrations import diffusers as spd  # noqa: E402
from spattn.launch import LocalRanks  # noqa: E402

from dist_harness import run_on_ranks  # noqa: E402

TOL = 1e-4   # per parameter: max abs error / that gradient's scale (fp32)
_MESHES = {}


def dp_sp_mesh(sp: int) -> spattn.SPMesh:
    """world = dp x sp ranks; SP groups are contiguous ranks (cached: groups are not free)."""
    if sp not in _MESHES:
        world, rank = dist.get_world_size(), dist.get_rank()
        if sp == world:
            _MESHES[sp] = spattn.init_mesh(ulysses_degree=sp)
        else:
            groups = [dist.new_group(list(range(i * sp, (i + 1) * sp))) for i in range(world // sp)]
            _MESHES[sp] = spattn.init_mesh(ulysses_degree=sp, group=groups[rank // sp])
    return _MESHES[sp]


# ---- a diffusers model with trainable modules outside it -------------------------------------------------

class Trainable(torch.nn.Module):
    """adapter (text embeddings) -> Qwen-Image transformer <- control (ControlNet-style residuals);
    head after the output. Inputs: latents (B, 35, 16), text (B, 6, 24)."""

    def __init__(self):
        super().__init__()
        import diffusers

        torch.manual_seed(0)
        self.transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
        self.adapter = torch.nn.Linear(24, 24)
        self.control = torch.nn.Linear(16, 64)
        self.head = torch.nn.Linear(16, 16)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = self.transformer(hidden_states=latents, encoder_hidden_states=self.adapter(text),
                               timestep=timestep, img_shapes=[[(1, 5, 7)]] * latents.shape[0],
                               controlnet_block_samples=[self.control(latents)], return_dict=False)[0]
        return self.head(out)


def batch(dp_rank: int):
    g = torch.Generator().manual_seed(100 + dp_rank)
    return (torch.randn(2, 35, 16, generator=g), torch.randn(2, 6, 24, generator=g),
            torch.tensor([0.3, 0.7])), torch.randn(2, 35, 16, generator=g)


def loss_fn(model, dp_rank):
    inputs, target = batch(dp_rank)
    return ((model(*inputs) - target) ** 2).mean()


def reference_grads(model: torch.nn.Module, dp: int):
    """Mean over the DP batches of the single-process gradients (what DP training computes)."""
    ref = copy.deepcopy(model)
    ref.zero_grad()
    for d in range(dp):
        (loss_fn(ref, d) / dp).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}


def grad_error(model: torch.nn.Module, ref: dict) -> float:
    """Worst relative gradient error over the parameters that have a reference gradient (the last
    block's text stream feeds nothing), worst over all ranks; inf for a missing grad."""
    worst = 0.0
    for n, p in model.named_parameters():
        if n not in ref:
            continue
        g = p.grad
        if g is None:
            return float("inf")
        if hasattr(g, "full_tensor"):   # FSDP2: a sharded DTensor
            g = g.full_tensor()
        worst = max(worst, float((g - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)))
    t = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def body_diffusers(way: str, sp: int) -> dict:
    mesh = dp_sp_mesh(sp)
    dp, dp_rank = dist.get_world_size() // sp, dist.get_rank() // sp
    model = Trainable().float()
    ref = reference_grads(model, dp)
    handle = spd.parallelize(model.transformer, mesh)
    errs = {}
    try:
        if way == "loop":
            model.zero_grad()
            loss_fn(model, dp_rank).backward()
            try:   # the transformer's own parameters only: refused, the adapter would stay partial
                handle.all_reduce_grads()
                errs["refused"] = 0.0
            except ValueError as e:
                errs["refused"] = float("params=" in str(e))
            handle.all_reduce_grads(params=model.parameters(), group=dist.group.WORLD)
            errs["grad"] = grad_error(model, ref)
        elif way == "ddp":
            # Qwen-Image's last block's text stream feeds nothing: unused parameters, as in one process
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            loss_fn(ddp, dp_rank).backward()
            errs["grad"] = grad_error(model, ref)
        elif way == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
            loss_fn(model, dp_rank).backward()
            errs["grad"] = grad_error(model, ref)
        else:
            raise ValueError(way)
    finally:
        handle.remove()
    return errs


@pytest.mark.parametrize("way", ["loop", "ddp", "fsdp"])
@pytest.mark.parametrize("world,sp", [(2, 2), (4, 2)], ids=["sp2", "dp2xsp2"])
def test_diffusers_gradients(way, world, sp):
    errs = run_on_ranks(world, body_diffusers, way, sp, timeout=600)
    assert errs["grad"] <= TOL, errs
    if way == "loop":
        assert errs["refused"] == 1.0, errs


# ---- accelerate (what diffusers' training scripts use), in fresh processes --------------------------------

def _env(rank: int, world: int, init_method: str) -> None:
    host, port = init_method[len("tcp://"):].split(":")
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def rank_accelerate(rank: int, world: int, init_method: str, sp: int, result_dir: str) -> None:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    _env(rank, world, init_method)
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    mesh = dp_sp_mesh(sp)
    model = Trainable().float()
    ref = reference_grads(model, world // sp)
    spd.parallelize(model.transformer, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapped, opt = acc.prepare(model, opt)
    acc.backward(loss_fn(wrapped, rank // sp))
    err = grad_error(acc.unwrap_model(wrapped), ref)
    if rank == 0:
        with open(os.path.join(result_dir, "err"), "w") as f:
            f.write(repr(err))
    dist.destroy_process_group()


def _launch(fn, world: int, *args) -> float:
    with tempfile.TemporaryDirectory() as d:
        with LocalRanks(fn, world, args=(*args, d), env={"OMP_NUM_THREADS": "1"}) as ranks:
            ranks.wait(timeout=600)
        with open(os.path.join(d, "err")) as f:
            return float(f.read())


def test_accelerate_gradients():
    pytest.importorskip("accelerate")
    assert _launch(rank_accelerate, 2, 2) <= TOL


# ---- transformers: DDP over an LLM, and Trainer ------------------------------------------------------------

def tiny_llm():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    sp = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="spattn", dtype=torch.float32)
    sp.load_state_dict(ref.state_dict())
    return ref, sp


def llm_batch(dp_rank: int) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(7 + dp_rank))
    return ids


def llm_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[1, :6] = -100   # unequal valid counts per row and per shard
    return labels


def llm_reference(ref, dp: int) -> dict:
    """Single-process gradients of the DP batches together (token-weighted mean over all of them)."""
    ids = torch.cat([llm_batch(d) for d in range(dp)])
    ref.zero_grad()
    ref(input_ids=ids, labels=llm_labels(ids), use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def body_llm_ddp(sp: int) -> dict:
    from spattn.integrations.transformers import global_loss, register, shard_inputs

    mesh = dp_sp_mesh(sp)
    register(mesh)
    dp, dp_rank = dist.get_world_size() // sp, dist.get_rank() // sp
    ref, model = tiny_llm()
    ids = llm_batch(dp_rank)
    # per-DP-batch single-process reference (DP's own convention: the mean over the DP batches)
    want = {}
    for d in range(dp):
        ref.zero_grad()
        i = llm_batch(d)
        ref(input_ids=i, labels=llm_labels(i), use_cache=False).loss.backward()
        for n, p in ref.named_parameters():
            want[n] = want.get(n, 0) + p.grad / dp
    want_loss = float(ref(input_ids=ids, labels=llm_labels(ids), use_cache=False).loss)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    out = ddp(**shard_inputs(ids, mesh, labels=llm_labels(ids)))
    out.loss.backward()
    return {"grad": grad_error(model, want), "loss": abs(float(global_loss(out.loss, mesh)) - want_loss) / want_loss}


@pytest.mark.parametrize("world,sp", [(2, 2), (4, 2)], ids=["sp2", "dp2xsp2"])
def test_llm_ddp_gradients(world, sp):
    errs = run_on_ranks(world, body_llm_ddp, sp, timeout=600)
    assert errs["grad"] <= 1e-5 and errs["loss"] <= 1e-5, errs


def rank_trainer(rank: int, world: int, init_method: str, sp: int, result_dir: str) -> None:
    """One optimizer step of HF Trainer; the gradients seen before the step vs one process."""
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from spattn.integrations.transformers import register, shard_inputs

    _env(rank, world, init_method)
    args = TrainingArguments(output_dir=result_dir, per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                             learning_rate=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0, max_grad_norm=0.0, average_tokens_across_devices=True)
    mesh = dp_sp_mesh(sp)
    register(mesh)
    dp = world // sp
    ref, model = tiny_llm()
    want = llm_reference(ref, dp)
    rows = [r for d in range(dp) for r in llm_batch(d)]

    def collate(samples):   # every SP rank of a DP group gets the same rows, then its shard of them
        ids = torch.stack(samples)
        return shard_inputs(ids, mesh, labels=llm_labels(ids))

    class SPTrainer(Trainer):
        def get_train_dataloader(self):   # shard the data over DP groups only, not over SP ranks
            sampler = DistributedSampler(rows, num_replicas=dp, rank=dist.get_rank() // sp, shuffle=False)
            return DataLoader(rows, batch_size=2, sampler=sampler, collate_fn=collate)

    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen["err"] = grad_error(kw["model"].module if hasattr(kw["model"], "module") else kw["model"], want)

    SPTrainer(model=model, args=args, train_dataset=rows, callbacks=[Grab()]).train()
    if rank == 0:
        with open(os.path.join(result_dir, "err"), "w") as f:
            f.write(repr(seen["err"]))
    dist.destroy_process_group()


def test_trainer_gradients():
    assert _launch(rank_trainer, 2, 2) <= 1e-5
