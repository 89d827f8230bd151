"""evaluate.py and gpt2.py: HellaSwag's file and packing, the val loss, the GPT-2 reference; all
offline, on files the tests write in the formats the real ones have."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_distributed import write_config_module
from test_train import manager_for, tiny_config, write_tiny_shards

import evaluate
from data.shards import BOS_ID
from gpt2 import GPT2Config, load_gpt2


def write_hellaswag(path, examples):
    """An eval file as llm.c's data_common.write_evalfile lays it out."""
    stream = []
    for index, (context, endings, label) in enumerate(examples):
        body = [index, label, len(endings), len(context), *context]
        for ending in endings:
            body += [len(ending), *ending]
        stream += [65535, 2 * (len(body) + 2), *body]
    header = np.zeros(256, dtype="<i4")
    header[:4] = (20240522, 1, len(examples), 0)
    path.write_bytes(header.tobytes() + np.array(stream, dtype="<u2").tobytes())
    return path


def random_examples(count, seed=0):
    rng = np.random.default_rng(seed)

    def tokens(low, high):
        return rng.integers(0, 50000, rng.integers(low, high)).tolist()

    return [(tokens(5, 40), [tokens(1, 12) for _ in range(4)], int(rng.integers(0, 4)))
            for _ in range(count)]


def test_hellaswag_file_round_trips_and_damage_is_named(tmp_path):
    examples = random_examples(5)
    path = write_hellaswag(tmp_path / "h.bin", examples)
    read = evaluate.read_hellaswag(path)
    assert [(e.context, e.endings, e.label) for e in read] == examples
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-6])
    with pytest.raises(evaluate.EvalError, match="cut.bin: example 4 is malformed or cut short"):
        evaluate.read_hellaswag(tmp_path / "cut.bin")
    damaged = bytearray(data)
    damaged[1024 + 2 * 5:1024 + 2 * 6] = b"\0\0"  # example 0's context length: now 0
    (tmp_path / "bad.bin").write_bytes(bytes(damaged))
    with pytest.raises(evaluate.EvalError, match="bad.bin: example 0 is malformed"):
        evaluate.read_hellaswag(tmp_path / "bad.bin")
    (tmp_path / "shard.bin").write_bytes(np.array([20240520, 1, 3], "<i4").tobytes() * 90)
    with pytest.raises(evaluate.EvalError, match="no llm.c eval file"):
        evaluate.read_hellaswag(tmp_path / "shard.bin")


def test_packed_hellaswag_scores_as_each_ending_alone(record55_model_config):
    # record #55's GPT keeps documents wholly apart (record #89's reads a document's first
    # token with the one before it, evaluate.py's docstring says so)
    from conftest import make_gpt

    torch.manual_seed(0)
    model = make_gpt(record55_model_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 0.05))
        model.tie.sync()
    model.yarn.set_windows((2, 4))
    raw = random_examples(12, seed=1)
    examples = [evaluate.Example(c, e, label) for c, e, label in raw]

    def alone(context, ending):  # the reference: one document, one forward pass, no packing
        document = torch.tensor([BOS_ID, *context, *ending])
        inputs = torch.cat([document[:-1], document.new_full((-(len(document) - 1) % 16,),
                                                             BOS_ID)])
        with torch.no_grad():
            logits = model(inputs)[:len(document) - 1]
        return F.cross_entropy(logits[len(context):], document[1 + len(context):]).item()

    predictions = [int(np.argmin([alone(e.context, end) for end in e.endings])) for e in examples]
    expected = sum(p == e.label for p, e in zip(predictions, examples, strict=True))
    sequences = evaluate.pack_hellaswag(examples, 256)
    assert len(sequences) > 1 and all(s.inputs.numel() == 256 for s in sequences)
    losses = evaluate.speedrun_losses(model, torch.device("cpu"))
    assert evaluate.hellaswag_accuracy(losses, sequences) == (expected, 12)
    # and with the labels set to the reference's predictions, every example is right
    agreeing = [evaluate.Example(e.context, e.endings, p) for e, p in zip(examples, predictions,
                                                                           strict=True)]
    assert evaluate.hellaswag_accuracy(losses, evaluate.pack_hellaswag(agreeing, 256)) == (12, 12)
    with pytest.raises(evaluate.EvalError, match="raise --seq_len"):
        evaluate.pack_hellaswag(examples, 32)


def test_evaluate_a_trained_model_end_to_end(tmp_path, capsys):
    config = tiny_config(tmp_path, write_tiny_shards(tmp_path))
    manager = manager_for(config, tmp_path)
    for _ in range(3):
        manager.train_step()
    manager.model.yarn.set_windows(manager.schedule.validation_windows, yarn=False)
    expected = manager.validate()  # what the trainer reports at the end of a run
    path = manager.save_model(expected)
    hellaswag = write_hellaswag(tmp_path / "h.bin", random_examples(6))
    assert evaluate.main([str(path), "--hellaswag_file", str(hellaswag), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    val = float(out.split("FineWeb val loss ")[1].split()[0])
    assert val == pytest.approx(expected, abs=1e-4)
    assert "over 256 tokens" in out
    assert "HellaSwag accuracy" in out and "of 6 examples (HellaSwag has 10,042)" in out


# -- GPT-2 ---------------------------------------------------------------------------------------


def write_tiny_gpt2(folder, seed=0):
    """A random GPT-2 in the files of a Hugging Face repository: config.json and
    model.safetensors with the original names, Conv1D weights stored (in, out), and the causal
    mask buffers older files carry."""
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2)
    g = torch.Generator().manual_seed(seed)
    D = config.n_embd

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    tensors = {"wte.weight": rand(config.vocab_size, D), "wpe.weight": rand(config.n_positions, D),
               "ln_f.weight": 1 + rand(D), "ln_f.bias": rand(D)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        tensors.update({
            p + "ln_1.weight": 1 + rand(D), p + "ln_1.bias": rand(D),
            p + "ln_2.weight": 1 + rand(D), p + "ln_2.bias": rand(D),
            p + "attn.c_attn.weight": rand(D, 3 * D), p + "attn.c_attn.bias": rand(3 * D),
            p + "attn.c_proj.weight": rand(D, D), p + "attn.c_proj.bias": rand(D),
            p + "mlp.c_fc.weight": rand(D, 4 * D), p + "mlp.c_fc.bias": rand(4 * D),
            p + "mlp.c_proj.weight": rand(4 * D, D), p + "mlp.c_proj.bias": rand(D),
            p + "attn.bias": torch.tril(torch.ones(1, 1, 1024, 1024)),
        })
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": D, "n_layer": 2, "n_head": 2, "n_positions": 1024,
         "vocab_size": config.vocab_size, "layer_norm_epsilon": 1e-5, "n_ctx": 1024}))
    return {k: v.double().numpy() for k, v in tensors.items()}


def numpy_gpt2(w, ids, n_layer=2, n_head=2):
    """GPT-2's forward pass, written out in numpy from the original's definition."""
    def layer_norm(x, p):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[p + ".weight"] + w[p + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    T = len(ids)
    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    for i in range(n_layer):
        p = f"h.{i}."
        qkv = layer_norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        heads = []
        for h in np.split(np.arange(q.shape[-1]), n_head):
            scores = q[:, h] @ k[:, h].T / np.sqrt(len(h))
            scores = np.where(np.tril(np.ones((T, T))) > 0, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(weights / weights.sum(-1, keepdims=True) @ v[:, h])
        x = x + np.concatenate(heads, -1) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        hidden = gelu(layer_norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + hidden @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return layer_norm(x, "ln_f") @ w["wte.weight"].T


def test_gpt2_matches_its_definition(tmp_path):
    weights = write_tiny_gpt2(tmp_path / "gpt2")
    model = load_gpt2(tmp_path / "gpt2")
    ids = np.array([BOS_ID, 464, 2068, 7586, 21831, 318, 257])
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None])[0].double().numpy()
    np.testing.assert_allclose(logits, numpy_gpt2(weights, ids), rtol=1e-4, atol=1e-4)


def test_gpt2_losses_keep_packed_documents_apart(tmp_path):
    write_tiny_gpt2(tmp_path / "gpt2")
    model = load_gpt2(tmp_path / "gpt2")
    documents = [[BOS_ID, 10, 20, 30, 40], [BOS_ID, 5, 6], [BOS_ID, 7, 8, 9, 11, 12, 13]]
    inputs = torch.tensor([t for d in documents for t in d])
    targets = torch.roll(inputs, -1)
    packed = evaluate.gpt2_losses(model, torch.device("cpu"))(inputs, targets)
    alone = []
    with torch.no_grad():
        for i, document in enumerate(documents):
            start = sum(len(d) for d in documents[:i])
            logits = model(torch.tensor(document)[None])[0]
            alone.append(F.cross_entropy(logits, targets[start:start + len(document)],
                                         reduction="none"))
    torch.testing.assert_close(packed, torch.cat(alone))


def test_evaluate_gpt2_end_to_end(tmp_path, capsys):
    write_tiny_gpt2(tmp_path / "gpt2")
    config = tiny_config(tmp_path, write_tiny_shards(tmp_path))
    config_file = write_config_module(tmp_path / "tiny.py", config)
    hellaswag = write_hellaswag(tmp_path / "h.bin", random_examples(4))
    assert evaluate.main(["--gpt2", str(tmp_path / "gpt2"), "--config", str(config_file),
                          "--hellaswag_file", str(hellaswag), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "GPT-2 from" in out and "FineWeb val loss" in out and "of 4 examples" in out


def test_bad_input_exits_2(tmp_path, capsys):
    assert evaluate.main([]) == 2
    assert "give a model or checkpoint PATH, or --gpt2" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "none")]) == 2
    assert "no model or checkpoint file" in capsys.readouterr().err
    (tmp_path / "m.safetensors").write_bytes(b"junk")
    assert evaluate.main([str(tmp_path / "m.safetensors"), "--hellaswag_file",
                          str(tmp_path / "missing.bin")]) == 2
    assert "--hellaswag_file: no file at" in capsys.readouterr().err
