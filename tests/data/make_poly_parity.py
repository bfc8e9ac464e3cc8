"""Writes tests/data/poly-peft-parity.json: peft's own Poly and MHR outputs on a tiny
two-layer net, for tests/test_poly.py. Run it with a separate venv that has peft (mtlref and its
tests never import this file nor peft):

    python3 -m venv /tmp/peftenv && /tmp/peftenv/bin/pip install torch==2.13.0 peft transformers
    /tmp/peftenv/bin/python tests/data/make_poly_parity.py

The net is x [B, L, 16] -> lin1 (16 -> 12, bias) -> lin2 (12 -> 8, bias); both layers get peft's
Poly, once as Poly (n_splits=1) and once as MHR (n_splits=2, which divides 16, 12 and 8). Every
Poly tensor is set to random non-zero values (B too, so ΔY != 0; logits N(0, 1), so the routing
weights are far from uniform). Keys (float32 unless said):
    base.{lin1,lin2}.{weight,bias}          the frozen nn.Linear weights
    x [B, L, 16], task_ids [B] (int64)      one batch with mixed tasks
    {poly,mhr}.{lin1,lin2}.poly_lora_A      peft's [n_splits, n_skills, in/n_splits, r]
    {poly,mhr}.{lin1,lin2}.poly_lora_B      peft's [n_splits, n_skills, r, out/n_splits]
    {poly,mhr}.{lin1,lin2}.module_logits    peft's poly_router.module_logits [n_tasks, n_splits·n_skills]
    {poly,mhr}.eval_out [B, L, 8]           the net's output in eval mode (σ routing)
    {poly,mhr}.train_out [B, L, 8]          in train mode right after torch.manual_seed(TRAIN_SEED)
                                            (relaxed-Bernoulli routing, lin1 draws first)
Its "metadata" records the peft, transformers and torch versions and the configs.
"""
import json
from pathlib import Path

import peft
import torch
import transformers
from peft import PolyConfig, get_peft_model

OUT = Path(__file__).resolve().parent / "poly-peft-parity.json"
CONFIGS = {"poly": dict(r=4, n_tasks=3, n_skills=3, n_splits=1),
           "mhr": dict(r=4, n_tasks=3, n_skills=3, n_splits=2)}
TRAIN_SEED = 1234


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(16, 12)
        self.lin2 = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.lin2(self.lin1(x))


def main():
    g = torch.Generator().manual_seed(0)
    base = Net()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    tensors = {f"base.{k}": v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(4, 3, 16, generator=g)
    task_ids = torch.tensor([2, 0, 1, 2])
    tensors.update(x=x, task_ids=task_ids)
    for name, cfg in CONFIGS.items():
        net = Net()
        net.load_state_dict(base.state_dict())
        model = get_peft_model(net, PolyConfig(target_modules=["lin1", "lin2"], **cfg))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "poly_" in key:                      # poly_lora_A, poly_lora_B, poly_router.*.module_logits
                    p.copy_((1.0 if "module_logits" in key else 0.5) * torch.randn(p.shape, generator=g))
        for layer in ("lin1", "lin2"):
            m = getattr(model.base_model.model, layer)
            tensors[f"{name}.{layer}.poly_lora_A"] = m.poly_lora_A["default"].detach().clone()
            tensors[f"{name}.{layer}.poly_lora_B"] = m.poly_lora_B["default"].detach().clone()
            tensors[f"{name}.{layer}.module_logits"] = m.poly_router["default"].module_logits.detach().clone()
        with torch.no_grad():
            model.eval()
            tensors[f"{name}.eval_out"] = model.base_model(x, task_ids=task_ids)
            model.train()
            torch.manual_seed(TRAIN_SEED)
            tensors[f"{name}.train_out"] = model.base_model(x, task_ids=task_ids)
        assert tensors[f"{name}.lin1.poly_lora_B"].abs().min() > 0
    meta = {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "configs": json.dumps(CONFIGS), "train_seed": str(TRAIN_SEED),
            "generator": "tests/data/make_poly_parity.py"}
    OUT.write_text(json.dumps({"metadata": meta, "tensors": {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "values": v.flatten().tolist()}
        for k, v in sorted(tensors.items())}}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {meta}")


if __name__ == "__main__":
    main()
