"""Position encodings and low-precision numerics by value, against the published formulas
written out here: RoPE's inverse frequencies (default, linear and LLaMA-3 scaling, as Meta's
apply_scaling defines them) and their path from config.json to the logits; ALiBi's slopes for
head counts that are and are not powers of two, and an MPT forward with 6 heads computed by
hand; MPT's logit_scale; and the fp32 upcasts of RMSNorm, T5's LayerNorm and RoPE in bf16."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES, need
from mtlref.pretrained import load_model
from mtlref.layers import RMSNorm
from mtlref.models import mpt
from mtlref.models.attention import (alibi_bias, alibi_slopes, rope_cos_sin, rope_inv_freq, rope_scaling,
                                     rope_theta)
from mtlref.models.t5 import T5LayerNorm


def rel_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> bool:
    return got.shape == want.shape and bool(((got.double() - want).abs() <= tol * want.abs()).all())


# ----------------------------------------------------------------------------- RoPE: the frequencies
def inv_freq_formula(head_dim: int, theta: float) -> torch.Tensor:
    """θ^(-2i/D), i = 0 .. D/2 - 1, in float64."""
    return torch.tensor([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)


def llama3_formula(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's LLaMA 3.1 apply_scaling, frequency by frequency: wavelengths shorter than
    old/high_freq_factor are kept, longer than old/low_freq_factor divided by factor, and those
    in between blended by smooth = (old/wavelen - low) / (high - low). Also returns which regime
    each frequency fell in."""
    low_wavelen, high_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    out, regimes = [], []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
            regimes.append("kept")
        elif wavelen > low_wavelen:
            out.append(f / factor)
            regimes.append("scaled")
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * f / factor + smooth * f)
            regimes.append("blended")
    return torch.tensor(out, dtype=torch.float64), regimes


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (128, 10000.0), (128, 500000.0)])
def test_rope_inverse_frequencies_default_and_linear(head_dim, theta):
    """θ^(-2i/D) by default; linear scaling divides every one of them by the factor."""
    want = inv_freq_formula(head_dim, theta)
    assert rel_close(rope_inv_freq(head_dim, theta), want)
    assert rel_close(rope_inv_freq(head_dim, theta, {"rope_type": "linear", "factor": 4.0}), want / 4)


@pytest.mark.parametrize("factor,low,high,old", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (4.0, 2.0, 8.0, 2048)])
def test_rope_llama3_scaling_is_metas_apply_scaling(factor, low, high, old):
    """LLaMA 3.1 (factor 8), 3.2 (factor 32) and a made-up setting; all three regimes occur."""
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old}
    base = inv_freq_formula(128, 500000.0)
    want, regimes = llama3_formula(base, factor, low, high, old)
    assert set(regimes) == {"kept", "blended", "scaled"}
    assert rel_close(rope_inv_freq(128, 500000.0, scaling), want)


def test_rope_config_styles():
    """θ: rope_parameters.rope_theta (new style), top-level rope_theta (old), else 10000; the
    scaling block from either style, None when it is the default."""
    assert rope_theta({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}) == 500000.0
    assert rope_theta({"rope_theta": 250000.0}) == 250000.0 and rope_theta({}) == 10000.0
    assert rope_scaling({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}) is None
    assert rope_scaling({}) is None
    new = rope_scaling({"rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}})
    assert new["rope_type"] == "llama3" and new["factor"] == 8.0
    old = rope_scaling({"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old["rope_type"] == "linear" and old["factor"] == 2.0


# ----------------------------------------------------------------------------- RoPE: in the model
def llama_with(tmp_path, **changes):
    """llama-tiny (sharded) with an edited config.json; the weight files are linked, not copied."""
    src = need(FIXTURES / "llama-tiny")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    for f in src.iterdir():
        if f.name.startswith("model"):
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return load_model(tmp_path)


@pytest.mark.parametrize("style", ["new", "old"])
def test_linear_rope_scaling_reaches_the_logits(tmp_path, style):
    """Linear scaling by 2 divides every frequency by 2, so positions 2p of the scaled model are
    positions p of the unscaled one: its logits there are the ones transformers computed."""
    params = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}
    changes = {"rope_parameters": params} if style == "new" else \
        {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}
    model = llama_with(tmp_path, **changes)
    ref = load_file(str(FIXTURES / "llama-tiny" / "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    positions = 2 * torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        at_2p = model(ids, attention_mask=mask, position_ids=positions)
        at_p = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (at_2p - ref["logits"])[real].abs().max().item() <= 1e-4
    assert (at_p - ref["logits"])[real].abs().max().item() > 1e-3          # the scaling is in effect


@pytest.mark.parametrize("old,stretch", [(1, 4), (10 ** 9, 1)])
def test_llama3_rope_scaling_reaches_the_logits(tmp_path, old, stretch):
    """With original_max_position_embeddings = 1 every wavelength (≥ 2π) is "long": all frequencies
    are divided by the factor (4), so positions 4p give the unscaled logits at p; with 10⁹ every
    wavelength is "short" and the model is the unscaled one."""
    model = llama_with(tmp_path, rope_parameters={"rope_theta": 10000.0, "rope_type": "llama3", "factor": 4.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": old})
    ref = load_file(str(FIXTURES / "llama-tiny" / "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=stretch * torch.arange(ids.shape[1]).expand_as(ids))
    assert (out - ref["logits"])[mask.bool()].abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- ALiBi
# MPT's slopes (llm-foundry gen_slopes, transformers build_mpt_alibi_tensor), written out:
# H' = the next power of two >= H, s_k = 2^(-8k/H') for k = 1..H'; for H < H' the slopes at
# even k (k = 2, 4, ..: these are the H'/2-head slopes) come first, then the odd k, cut to H.
SLOPES = {
    1: [2 ** -8],
    4: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8],
    6: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],                       # H' = 8
    8: [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8],
    12: [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8,     # H' = 16: s_k = 2^(-k/2)
         2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5],
}


def press_slopes(n: int) -> list[float]:
    """The ALiBi paper's construction (Press et al. 2022, §3): for n a power of two the geometric
    sequence from 2^(-8/n) with ratio 2^(-8/n); otherwise the slopes of the largest power of two
    m < n, then every other slope (the 1st, 3rd, ...) of the 2m-head sequence, n - m of them."""
    def geometric(m):
        return [2 ** (-8 * k / m) for k in range(1, m + 1)]
    m = 2 ** int(math.floor(math.log2(n)))
    return geometric(m) if m == n else geometric(m) + geometric(2 * m)[0::2][: n - m]


@pytest.mark.parametrize("n", sorted(SLOPES))
def test_alibi_slopes_by_hand(n):
    """The slopes written out above, for 1, 4, 6, 8 and 12 heads."""
    assert alibi_slopes(n).tolist() == pytest.approx(SLOPES[n], rel=1e-6)


def test_alibi_slopes_equal_the_papers_construction_for_every_head_count():
    """MPT's next-power-of-two reading and the paper's previous-power-of-two one agree."""
    for n in range(1, 41):
        assert alibi_slopes(n).tolist() == pytest.approx(press_slopes(n), rel=1e-6), n


def test_alibi_bias_max_and_bias_by_value():
    """alibi_bias_max sets the exponent's scale; the bias is slope_h · (key - query)."""
    assert alibi_slopes(4, bias_max=16.0).tolist() == pytest.approx([2 ** -4, 2 ** -8, 2 ** -12, 2 ** -16])
    q, k = torch.arange(3, 6), torch.arange(6)                        # 3 new queries over 6 keys
    bias = alibi_bias(6, q, k)
    assert bias.shape == (6, 3, 6)
    for h in range(6):
        for i, qi in enumerate(q.tolist()):
            for j in range(6):
                assert bias[h, i, j].item() == pytest.approx(SLOPES[6][h] * (j - qi), abs=1e-7)


def mpt_by_hand(model: mpt.Model, ids: torch.Tensor, mask: torch.Tensor, slopes: list[float]) -> torch.Tensor:
    """MPT's forward, one sample and one head at a time: softmax(q kᵀ/√D + slope_h (j - i)) over the
    real keys j <= i, pre-LayerNorm blocks, GELU MLP, tied head."""
    cfg = model.config
    C, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
    tr = model.transformer

    def ln(x, norm):
        return F.layer_norm(x, (C,), norm.weight, norm.bias, cfg.layer_norm_epsilon)
    x = tr.wte.weight[ids]                                            # (B, T, C)
    B, T = ids.shape
    for blk in tr.blocks:
        q, k, v = (ln(x, blk.norm_1) @ blk.attn.Wqkv.weight.T).split(C, dim=-1)
        att = torch.zeros(B, T, C)
        for b in range(B):
            for h in range(H):
                cols = slice(h * D, (h + 1) * D)
                for i in range(T):
                    keys = [j for j in range(i + 1) if mask[b, j]]
                    if not keys:
                        continue
                    s = torch.stack([q[b, i, cols] @ k[b, j, cols] / math.sqrt(D) + slopes[h] * (j - i) for j in keys])
                    p = torch.softmax(s, 0)
                    att[b, i, cols] = sum(p[n] * v[b, j, cols] for n, j in enumerate(keys))
        x = x + att @ blk.attn.out_proj.weight.T
        x = x + F.gelu(ln(x, blk.norm_2) @ blk.ffn.up_proj.weight.T) @ blk.ffn.down_proj.weight.T
    return ln(x, tr.norm_f) @ tr.wte.weight.T


def test_mpt_with_six_heads_equals_the_forward_by_hand():
    """6 heads (not a power of two): each head gets its slope, in order, in the attention."""
    torch.manual_seed(0)
    model = mpt.Model(mpt.Config(vocab_size=40, d_model=24, n_heads=6, n_layers=2))
    with torch.no_grad():
        for blk in model.transformer.blocks:                          # q·k large enough to compete with ALiBi
            blk.attn.Wqkv.weight.mul_(10)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        want = mpt_by_hand(model, ids, mask, SLOPES[6])
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize("logit_scale,factor", [(0.5, 0.5), ("inv_sqrt_d_model", 1 / 8)])
def test_mpt_logit_scale_multiplies_the_logits(tmp_path, logit_scale, factor):
    """llm-foundry's MPT: logits *= logit_scale; "inv_sqrt_d_model" is 1/√d_model (d_model 64)."""
    src = need(FIXTURES / "mpt-tiny")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["d_model"] == 64 and cfg["logit_scale"] is None
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, logit_scale=logit_scale)))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    model = load_model(tmp_path)
    ref = load_file(str(src / "reference.safetensors"))
    with torch.no_grad():
        logits = model(ref["input_ids"], attention_mask=ref["attention_mask"])
    real = ref["attention_mask"].bool()
    assert (logits - factor * ref["logits"])[real].abs().max().item() <= 1e-4 * factor


# ----------------------------------------------------------------------------- bf16: the fp32 upcasts
# One bf16 rounding of a result is a relative error of at most 2^-8 = 0.0039 (bf16 keeps 8
# significant bits); the norms below measure 0.00389 (one rounding: the statistic is taken in fp32),
# and 0.0079 without the upcast (x², its mean and the rsqrt each rounded to bf16). Tolerance: 1.5 x
# the measured error.
NORM_BF16_REL = 1.5 * 0.0039


@pytest.mark.parametrize("norm", [RMSNorm, T5LayerNorm])
@pytest.mark.parametrize("dim", [64, 4096])
def test_rms_norms_take_their_statistic_in_fp32(norm, dim):
    """y = x / sqrt(mean(x²) + eps) on a bf16 input (unit weight, so only the norm is measured),
    against float64: within one bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(256, dim, generator=g) + 0.5).bfloat16()
    layer = norm(dim, 1e-6).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    err = ((y.double() - want).abs() / want.abs()).max().item()
    assert err <= NORM_BF16_REL


def test_rope_angles_are_taken_in_fp32_for_a_bf16_model():
    """cos/sin of p·θ^(-2i/D) for positions up to 4095 in a bf16 model: the angle is formed in fp32
    and only the result is rounded. Measured max error 0.0021 (half a bf16 step at 1 is 0.00195);
    an angle formed in bf16 is off by whole radians at p = 4095 (error 2.0)."""
    D, theta = 128, 500000.0
    pos = torch.arange(4096)[None]
    cos, sin = rope_cos_sin(pos, rope_inv_freq(D, theta), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 1, 4096, D)
    angle = pos[0].double()[:, None] * inv_freq_formula(D, theta)
    angle = torch.cat([angle, angle], -1)                              # the D/2 frequencies twice (HF layout)
    assert (cos[0, 0].double() - angle.cos()).abs().max().item() <= 1.5 * 0.0021
    assert (sin[0, 0].double() - angle.sin()).abs().max().item() <= 1.5 * 0.0021
