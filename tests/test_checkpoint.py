"""load_model on broken checkpoint directories: each failure is a CheckpointError naming the
file (and key) at fault. Fixtures are copied into tmp_path and damaged there."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtlref.pretrained import CheckpointError, load_model
from conftest import need

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"


def copy(name: str, tmp_path: Path) -> Path:
    """A writable copy of shared/weights/<name> (the shared files are read-only)."""
    src = need(WEIGHTS / name)
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    dst.chmod(0o755)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(tmp_path):
    path = copy("fixtures/llama-tiny", tmp_path)
    (path / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00003-of-00006\.safetensors: missing shard"):
        load_model(path)


def test_broken_index(tmp_path):
    path = copy("fixtures/llama-tiny", tmp_path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.001])          # cut in the data, and in the header
def test_truncated_file(tmp_path, keep):
    path = copy("fixtures/mpt-tiny", tmp_path)
    file = path / "model.safetensors"
    os.truncate(file, int(file.stat().st_size * keep))
    with pytest.raises(CheckpointError, match=r"mpt-tiny/model\.safetensors: cannot be read.*truncated"):
        load_model(path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path = copy("fixtures/llama-tiny", tmp_path)
    edit_config(path, intermediate_size=128)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "model-0000" in msg and "mlp." in msg and "(176, 64)" in msg and "(128, 64)" in msg


def test_missing_key(tmp_path):
    path = copy("fixtures/mpt-tiny", tmp_path)
    state = load_file(path / "model.safetensors")
    del state["transformer.norm_f.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mpt-tiny: missing keys \['transformer\.norm_f\.weight'\]"):
        load_model(path)


def test_unexpected_key(tmp_path):
    path = copy("fixtures/mpt-tiny", tmp_path)
    state = load_file(path / "model.safetensors")
    state["transformer.blocks.0.attn.q_norm.weight"] = torch.ones(64)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: unexpected key 'transformer\.blocks\.0\.attn\.q_norm\.weight'"):
        load_model(path)


def test_known_extras_are_skipped(tmp_path):
    # a tied model may store its head's copy; old transformers stored RoPE's inv_freq buffer
    path = copy("babyllama-1m", tmp_path)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, path / "model.safetensors")
    model = load_model(path)
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()


def test_unknown_model_type(tmp_path):
    path = copy("fixtures/mpt-tiny", tmp_path)
    edit_config(path, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_model(path)


def test_no_config(tmp_path):
    path = copy("fixtures/mpt-tiny", tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"mpt-tiny: no config\.json"):
        load_model(path)


def test_bad_json(tmp_path):
    path = copy("fixtures/mpt-tiny", tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_no_weights(tmp_path):
    path = copy("fixtures/mpt-tiny", tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"mpt-tiny: no model\.safetensors"):
        load_model(path)


def test_loads_into_dtype_and_records_identity():
    path = need(WEIGHTS / "fixtures" / "llama-tiny")
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model.base_identity["model_type"] == "llama" and len(model.base_identity["config_sha256"]) == 16
