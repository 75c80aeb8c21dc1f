"""HF -> megatron -> HF converters: bit-exact round trips on tiny Qwen2 (QKV bias), tied Llama
and Qwen3 (q/k norms), all with GQA and a vocabulary (1031) no TP size divides; the megatron
checkpoint is read back at TP=2 x PP=2 in a 4-process job; the result loads in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_rl.checkpoint.convert import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_rl.errors import CheckpointError, ConfigError, UserError
from tests.checkpoint.conftest import FAMILIES
from tests.helpers.launch import torchrun

WORKERS = Path(__file__).parent / "workers"


def read_hf(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, checking the index (if any) names every shard's tensors."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(out)
        assert {folder / v for v in weight_map.values()} == set(files)
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    return out


def assert_bit_exact(src: Path, dst: Path) -> None:
    a, b = read_hf(src), read_hf(dst)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((dst / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def assert_loads_in_transformers(folder: Path) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    ids = torch.tensor([[1, 5, 1030, 7]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory, world1):
    """Every family converted HF -> megatron (validated for TP=2 x PP=2) once."""
    root = tmp_path_factory.mktemp("convert")
    for name, hf in hf_models.items():
        convert_hf_to_mcore(hf, root / f"mcore_{name}", tp=2, pp=2)
    return root


@pytest.mark.parametrize("name", list(FAMILIES))
def test_single_process_round_trip(converted, hf_models, name, tmp_path):
    ckpt = converted / f"mcore_{name}"
    meta = json.loads((ckpt / "megatron_rl_meta.json").read_text())
    assert meta["kind"] == "weights" and meta["vocab_size"] == 1031 and meta["family"] == FAMILIES[name][0]
    assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "hf" / "generation_config.json").is_file()
    out = convert_mcore_to_hf(ckpt, tmp_path / "hf", max_shard_bytes=150_000)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded, with an index
    assert_bit_exact(hf_models[name], out)
    assert_loads_in_transformers(out)
    one = convert_mcore_to_hf(ckpt, tmp_path / "hf_one")  # default 5 GB: one file, no index
    assert not (one / "model.safetensors.index.json").exists()
    assert_bit_exact(hf_models[name], one)


@pytest.mark.slow
def test_round_trip_through_tp2_pp2(converted, hf_models):
    torchrun(4, WORKERS / "export_tp2pp2.py", converted, *FAMILIES, timeout=600)
    for name in FAMILIES:
        back = converted / f"back_{name}"
        assert_bit_exact(hf_models[name], back)
        assert_loads_in_transformers(back)


def test_converter_errors(converted, hf_models, tmp_path):
    with pytest.raises(ConfigError, match="tp=3"):
        convert_hf_to_mcore(hf_models["qwen2"], tmp_path / "x", tp=3, pp=1)  # 4 heads, 2 groups
    with pytest.raises(UserError, match="not empty"):
        convert_mcore_to_hf(converted / "mcore_qwen2", converted)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_mcore_to_hf(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(UserError, match="config.json"):
        convert_hf_to_mcore(tmp_path, tmp_path / "out2")  # an empty folder is no HF model
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing half-written


def test_cli_round_trip(converted, hf_models, tmp_path, capsys):
    import argparse

    from megatron_rl.checkpoint.cli import add_convert_parser, parse_size, run_convert

    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "hf-to-mcore", "--hf", str(hf_models["qwen3"]), "--out",
                              str(tmp_path / "mc"), "--tp", "2", "--pp", "4"])
    assert run_convert(args) == 0
    args = parser.parse_args(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out",
                              str(tmp_path / "hf"), "--max-shard-size", "100KB"])
    assert run_convert(args) == 0
    assert_bit_exact(hf_models["qwen3"], tmp_path / "hf")
    assert "wrote HF model" in capsys.readouterr().out
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots")


def test_bfloat16_round_trip(hf_models, tmp_path, world1):
    import transformers

    src = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(str(hf_models["qwen2"])).to(torch.bfloat16).save_pretrained(src)
    convert_hf_to_mcore(src, tmp_path / "mcore", tp=2, pp=2)
    meta = json.loads((tmp_path / "mcore" / "megatron_rl_meta.json").read_text())
    assert meta["dtype"] == "bfloat16"
    out = convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    assert_bit_exact(src, out)
    assert next(iter(read_hf(out).values())).dtype == torch.bfloat16
