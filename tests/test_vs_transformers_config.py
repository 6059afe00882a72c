"""benchmarks/vs_transformers.py builds transformers' model from our config: read back through the loader's
config_from_hf it is the same model (every field but the MTP layers, which that benchmark does not run, and token
ids), so its table compares like with like."""
import dataclasses
import sys
from pathlib import Path

import pytest

from mimo_jax.config import config_from_hf, load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("name", ["tiny_mimo", "mid_mimo", "mimo_v2_flash", "smollm2_135m"])
def test_hf_config_round_trips(name):
    from vs_transformers import hf_config

    cfg = load_config(ROOT / "configs" / f"{name}.json")
    back = config_from_hf(hf_config(cfg).to_dict())
    ignored = {"num_mtp_layers", "bos_token_id", "eos_token_ids"}
    diffs = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
             if f.name not in ignored and getattr(cfg, f.name) != getattr(back, f.name)}
    assert not diffs
