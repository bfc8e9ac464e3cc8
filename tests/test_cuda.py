"""What only a GPU can check, run by scripts/gpu_check.sh (`pytest -m cuda`): bf16 autocast with
fp32 adapters, merging into a bf16 base, generation with the KV cache, checkpoint and resume on
CUDA, and a one-process NCCL group. Without a CUDA device they are skipped, saying so."""
import os
import socket

import pytest
import torch

from conftest import FIXTURES, need
from mtlref import attach_adapters, generate, load_model, merge_adapters
from mtlref.adapters import adapters_of
from mtlref.layers import ForwardContext
from mtlref.train import LoopConfig, fit

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device here: scripts/gpu_check.sh runs these on a GPU")]
DEV = "cuda"


def llama(dtype=torch.bfloat16):
    return load_model(need(FIXTURES / "llama-tiny"), dtype=dtype, device=DEV)


def batch(model, n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, t), generator=g).to(DEV)
    return ids, torch.ones_like(ids), (torch.arange(n) % 2).to(DEV)


@pytest.mark.parametrize("method", ["lora", "mtl-lora", "more"])
def test_bf16_autocast_trains_fp32_adapters(method):
    model = llama()
    attach_adapters(model, method, ["q_proj", "v_proj"], num_tasks=2)
    ids, mask, tids = batch(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids, attention_mask=mask, ctx=ForwardContext(task_ids=tids, aux_losses={}))
    logits.float().pow(2).mean().backward()
    for a in adapters_of(model).values():
        for p in a.parameters():
            assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters() if p.requires_grad)


def test_merging_into_a_bf16_base():
    model = llama()
    attach_adapters(model, "mtl-lora", ["q_proj", "o_proj"], num_tasks=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids, mask, _ = batch(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(ids, attention_mask=mask, task_ids=torch.ones(4, dtype=torch.long, device=DEV)).float()
        got = merge_adapters(model, 1)(ids, attention_mask=mask).float()
    assert merge_adapters(model, 1).model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert (got - want).abs().max() <= 0.03 * want.abs().max()        # bf16 rounding of W + ΔW


def test_generate_with_and_without_the_cache():
    model = llama(torch.float32)
    ids, _, _ = batch(model, n=2, t=6)
    prompts = ids.tolist()
    assert generate(model, None, prompts, max_new_tokens=12, eos_id=-1) == \
        generate(model, None, prompts, max_new_tokens=12, eos_id=-1, use_cache=False)


class LM(torch.nn.Module):
    """A language-model objective over the backbone, as the loop expects (forward, loss)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch, ctx=None):
        return self.backbone(batch["input_ids"], attention_mask=batch["attention_mask"], ctx=ctx)

    def loss(self, out, batch):
        return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


class Stop(Exception):
    pass


def test_checkpoint_and_resume_on_cuda(tmp_path):
    """6 steps on CUDA, against 3 steps, a checkpoint, a stop and a resume: the same adapters."""
    def run(out, limit=None, resume=False):
        torch.manual_seed(0)
        model = llama(torch.float32)
        attach_adapters(model, "mtl-lora", ["q_proj", "v_proj"], num_tasks=2, dropout=0.1)
        ids, mask, tids = batch(model)

        def data():
            for step in range(10 ** 6):
                if limit is not None and step == limit:
                    raise Stop
                yield {"input_ids": ids, "attention_mask": mask, "task_ids": tids}
        cfg = LoopConfig(max_steps=6, lr=1e-2, device=DEV, save_every=3, checkpoint_dir=str(out), resume=resume)
        try:
            fit(LM(model).train(), data(), cfg)
        except Stop:
            pass
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".adapter." in k}
    whole = run(tmp_path / "whole")
    run(tmp_path / "stopped", limit=3)
    again = run(tmp_path / "stopped", resume=True)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_a_one_process_nccl_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.ones(4, device=DEV)
        torch.distributed.all_reduce(x)
        assert torch.equal(x.cpu(), torch.ones(4))
    finally:
        torch.distributed.destroy_process_group()
