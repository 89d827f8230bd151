"""checkpoints.py: state to safetensors + JSON and back, atomic writes, pruning, load_model."""

import json
import math

import pytest
import torch
from conftest import make_gpt
from safetensors import safe_open

import checkpoints
from data.shards import BOS_ID


def test_state_round_trips_exactly(tmp_path):
    state = {"step": 7, "time": 0.1 + 0.2, "nan": math.nan, "name": "run", "flag": True,
             "nothing": None, "pairs": [(1, 2.5), [3, None]],
             "weights": {"w": torch.randn(3, 4), "half": torch.randn(5).bfloat16(),
                         "scalar": torch.tensor(2.0), "bytes": torch.get_rng_state()},
             "tensors": [torch.arange(3), {"deep": torch.ones(2, dtype=torch.int32)}]}
    path = checkpoints.write(tmp_path / "a.safetensors", "checkpoint", state)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no .tmp left
    kind, back = checkpoints.read(path)
    assert kind == "checkpoint"
    assert back["step"] == 7 and back["time"] == 0.1 + 0.2 and math.isnan(back["nan"])
    assert (back["name"], back["flag"], back["nothing"]) == ("run", True, None)
    assert back["pairs"] == [[1, 2.5], [3, None]]  # tuples come back as lists
    for key, tensor in state["weights"].items():
        assert torch.equal(back["weights"][key], tensor) and back["weights"][key].dtype == \
            tensor.dtype
    assert torch.equal(back["tensors"][1]["deep"], state["tensors"][1]["deep"])
    # the file is plain safetensors: the tensors by name, the rest as JSON in the metadata
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["/tensors/0", "/tensors/1/deep", "/weights/bytes",
                                    "/weights/half", "/weights/scalar", "/weights/w"]
        document = json.loads(f.metadata()["state"])
    assert document["weights"]["w"] == {"__tensor__": "/weights/w"}


def test_state_that_json_would_change_is_refused(tmp_path):
    with pytest.raises(TypeError, match="keys must be strings"):
        checkpoints.write(tmp_path / "a.safetensors", "checkpoint", {"by_index": {1: 2}})
    with pytest.raises(TypeError, match="set is neither a tensor nor plain data"):
        checkpoints.write(tmp_path / "a.safetensors", "checkpoint", {"s": {1}})


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoints.write(checkpoints.checkpoint_path(tmp_path, "run_ab", step), "checkpoint", {})
    other = checkpoints.write(checkpoints.checkpoint_path(tmp_path, "run_cd", 1), "checkpoint",
                              {})
    removed = checkpoints.prune(tmp_path, "run_ab", keep=2)
    assert [p.name for p in removed] == ["run_ab_step000005.safetensors",
                                         "run_ab_step000010.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run_ab_step000015.safetensors", "run_ab_step000020.safetensors", other.name]
    assert checkpoints.prune(tmp_path, "run_ab", keep=0) == []


@pytest.mark.parametrize("tied", [True, False])
def test_load_model_rebuilds_the_trained_model(tmp_path, tiny_model_config, tied):
    torch.manual_seed(0)
    model = make_gpt(tiny_model_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if tied:
            model.tie.sync()
    model.tie.tied = tied
    model.yarn.set_windows((1, 2))
    model.yarn.set_windows((1, 4))  # YaRN moves the frequencies and the scale
    model.yarn.set_windows((2, 5), yarn=False)
    raw = {"model_config": tiny_model_config, "schedule": {"validation_windows": (2, 5)}}
    path = checkpoints.write(tmp_path / "m.safetensors", "model",
                             {"model": model.state_dict(), "config": raw})
    loaded, state = checkpoints.load_model(path)
    assert loaded.tie.tied == tied and loaded.yarn.current == (2, 5)
    assert torch.equal(loaded.yarn.rotary_freqs, model.yarn.rotary_freqs)
    x = torch.randint(0, 50000, (48,))
    x[[0, 20]] = BOS_ID
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert state["config"]["schedule"]["validation_windows"] == [2, 5]
