"""layers/embeddings.py: the embedding tie and its untie, value embeddings, the smear gate."""

import pytest
import torch
from test_model import make_model, tokens

from data.shards import BOS_ID
from layers.embeddings import SmearGate, ValueEmbeddings
from optimizers import OptimizerConfig, build_optimizer


class StateCopies:
    """The optimizer side of an untie: records the copy it is asked for."""

    def __init__(self):
        self.copies = []

    def copy_state(self, target, source):
        self.copies.append((target, source))


def test_untie(tiny_model_config):
    gpt = make_model(tiny_model_config)
    x, y = tokens(64), tokens(64, seed=3)
    before = gpt(x)
    assert gpt.tie.tied
    optimizer = StateCopies()
    gpt.tie.untie(optimizer)
    assert not gpt.tie.tied and optimizer.copies == [(gpt.embed, gpt.lm_head)]
    torch.testing.assert_close(gpt(x), before, atol=0, rtol=0)
    gpt(x, y).backward()
    gpt.tie.fold_grad()  # untied: both keep their own gradients
    assert gpt.embed.grad is not None and gpt.lm_head.grad is not None
    with torch.no_grad():
        gpt.embed.add_(1.0)
    gpt.tie.sync()
    assert not torch.equal(gpt.embed, gpt.lm_head)
    with pytest.raises(RuntimeError, match="already untied"):
        gpt.tie.untie(optimizer)


def test_untie_copies_the_lm_heads_optimizer_state(tiny_model_config, optimizer_config):
    gpt = make_model(tiny_model_config)
    optimizer = build_optimizer(gpt, OptimizerConfig.from_dict(optimizer_config))
    gpt(tokens(64), tokens(64, seed=3)).backward()
    gpt.tie.fold_grad()
    optimizer.step()
    gpt.tie.untie(optimizer)
    states = {p["name"]: p["state"] for p in optimizer.state_dict()["params"]}
    for key, value in states["lm_head"].items():
        if torch.is_tensor(value):
            assert value.abs().sum() > 0 and torch.equal(states["embed"][key], value), key


def test_folded_gradient_is_that_of_one_shared_tensor(tiny_model_config):
    gpt = make_model(tiny_model_config)
    x, y = tokens(64), tokens(64, seed=3)
    shared = torch.func.functional_call(gpt, {"embed": gpt.lm_head}, (x, y))
    expected = torch.autograd.grad(shared, gpt.lm_head)[0]
    gpt(x, y).backward()
    assert not torch.equal(gpt.embed.grad, torch.zeros_like(gpt.embed.grad))
    gpt.tie.fold_grad()
    assert gpt.embed.grad is None
    torch.testing.assert_close(gpt.lm_head.grad, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        gpt.lm_head.sub_(1.0)
    gpt.tie.sync()
    assert torch.equal(gpt.embed, gpt.lm_head)


def test_the_tie_travels_in_the_state_dict(tiny_model_config):
    gpt = make_model(tiny_model_config)
    gpt.tie.untie(StateCopies())
    fresh = make_model(tiny_model_config)
    assert fresh.tie.tied
    fresh.load_state_dict(gpt.state_dict())
    assert not fresh.tie.tied


def test_value_embeddings_feed_their_layers():
    embeds = ValueEmbeddings(vocab=10, dim=4, layers_per_table=((0, 3), (1,)))
    with torch.no_grad():
        for i, table in enumerate(embeds.tables):
            table.copy_(torch.arange(40.0).view(10, 4) + 100 * i)
    out = embeds(torch.tensor([2, 5]), torch.float32)
    assert sorted(out) == [0, 1, 3] and out[0] is out[3]
    torch.testing.assert_close(out[1][0], torch.tensor([[108.0, 109, 110, 111],
                                                        [120.0, 121, 122, 123]]))


def test_smear_gate_takes_in_the_previous_token_but_not_across_documents():
    smear = SmearGate()
    with torch.no_grad():
        smear.strength.fill_(1.0)  # the gate reads zeros at init: sigmoid(0) = 1/2
    x = torch.arange(48.0).view(1, 4, 12)
    inputs = torch.tensor([BOS_ID, 7, BOS_ID, 9])
    out = smear(x, inputs)
    expected = x.clone()
    expected[0, 1] += 0.5 * x[0, 0]
    expected[0, 3] += 0.5 * x[0, 2]  # token 2 starts a document: it takes in nothing
    torch.testing.assert_close(out, expected)
