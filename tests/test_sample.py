"""sample.py: sampling from a model file or a checkpoint, streamed, a decode step a token."""

import pytest
import torch
from conftest import make_gpt
from test_train import manager_for, tiny_config, write_tiny_shards

import checkpoints
import sample
from data.shards import BOS_ID
from model import GPT


@pytest.fixture
def model_file(tmp_path, tiny_model_config):
    """A tiny model with every part carrying signal, written as a run writes its model."""
    torch.manual_seed(0)
    model = make_gpt(tiny_model_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 0.05))
        model.tie.sync()
    raw = {"model_config": tiny_model_config, "schedule": {"validation_windows": (1, 2)}}
    return checkpoints.write(tmp_path / "m.safetensors", "model",
                             {"model": model.state_dict(), "config": raw})


def greedy_by_full_passes(model, prompt, steps):
    """The reference: a forward pass over the whole text for every new token, its argmax (the
    text filled up to whole attention blocks with BOS, which no earlier token sees)."""
    tokens, block = list(prompt), model.config.block_size
    with torch.no_grad():
        for _ in range(steps):
            padded = tokens + [BOS_ID] * (-len(tokens) % block)
            tokens.append(int(model(torch.tensor(padded))[len(tokens) - 1].argmax()))
            if tokens[-1] == BOS_ID:
                break
    return tokens[len(prompt):]


def test_top_1_sampling_is_the_greedy_continuation(model_file, gpt2, capsys):
    prompt = "The quick brown fox"
    assert sample.main([str(model_file), "--prompt", prompt, "--top_k", "1",
                        "--max_new_tokens", "12", "--num_samples", "2", "--device", "cpu"]) == 0
    model, _ = checkpoints.load_model(model_file)
    expected = greedy_by_full_passes(model, [BOS_ID, *gpt2.encode_ordinary(prompt)], 12)
    text = prompt + gpt2.decode([t for t in expected if t != BOS_ID])
    assert capsys.readouterr().out == f"{text}\n{'-' * 40}\n" * 2


def test_seeds_repeat_and_differ(model_file, gpt2, capsys):
    def draw(seed):
        assert sample.main([str(model_file), "--seed", str(seed), "--temperature", "1.0",
                            "--top_k", "0", "--max_new_tokens", "8", "--device", "cpu"]) == 0
        return capsys.readouterr().out

    assert draw(1) == draw(1) != draw(2)


def test_generation_is_streamed_one_decode_step_a_token(model_file, monkeypatch):
    model, _ = checkpoints.load_model(model_file)
    calls = []
    decode = GPT.decode

    def counted(self, inputs, state):
        calls.append(inputs.numel())
        return decode(self, inputs, state)

    monkeypatch.setattr(GPT, "decode", counted)
    tokens = sample.generate(model, [BOS_ID, 464, 2068], 5, 1.0, None, torch.Generator())
    first = next(tokens)  # a token comes out before the next is computed
    assert calls == [3]
    rest = list(tokens)
    assert calls == [3] + [1] * len(rest) and len(rest) == 4  # no step after the last token
    assert BOS_ID not in [first, *rest[:-1]]


def test_top_k_keeps_only_the_likeliest():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    generator = torch.Generator().manual_seed(0)
    drawn = {sample.sample_token(logits, 5.0, 2, generator) for _ in range(200)}
    assert drawn == {1, 3}


def test_a_multibyte_character_split_across_tokens_prints_once(gpt2):
    ids = gpt2.encode_ordinary("caf\u00e9 \U0001f600")
    stream = sample.TextStream(gpt2)
    assert "".join(stream.add(t) for t in ids) + stream.add(BOS_ID) == "caf\u00e9 \U0001f600"


def test_samples_from_an_untied_checkpoint(tmp_path, gpt2, capsys):
    config = tiny_config(tmp_path, write_tiny_shards(tmp_path))
    manager = manager_for(config, tmp_path)
    for _ in range(7):  # untied at step 6
        manager.train_step()
    path = manager.save_checkpoint(tmp_path / "late.safetensors")
    assert not manager.model.tie.tied
    assert sample.main([str(path), "--prompt", "Once", "--top_k", "1", "--max_new_tokens", "4",
                        "--device", "cpu"]) == 0
    manager.model.yarn.set_windows(manager.schedule.validation_windows, yarn=False)
    expected = greedy_by_full_passes(manager.model, [BOS_ID, *gpt2.encode_ordinary("Once")], 4)
    assert capsys.readouterr().out.startswith("Once" + gpt2.decode(
        [t for t in expected if t != BOS_ID]) + "\n")


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--top_k", "-1"], "--top_k must be >= 0"),
])
def test_bad_arguments_exit_2(model_file, capsys, args, message):
    assert sample.main([str(model_file), *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_files_exit_2(tmp_path, capsys):
    assert sample.main([str(tmp_path / "none.safetensors")]) == 2
    assert "no model or checkpoint file at" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert sample.main([str(tmp_path / "junk.safetensors"), "--device", "cpu"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
