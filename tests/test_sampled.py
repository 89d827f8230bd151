"""layers/sampled.py against record #92's sampled softmax (tests/reference/record92/sampled.pt,
README there): its candidate sets at the record's size and at tiny shapes, and the loss and
gradients over them."""

import numpy as np
import pytest
import torch
from conftest import make_gpt

from layers.head import prediction_targets
from layers.masks import document_ids
from layers.sampled import CandidateSampler, positions_in, sampled_loss
from utils import REPO_ROOT

REFERENCE = torch.load(REPO_ROOT / "tests" / "reference" / "record92" / "sampled.pt",
                       weights_only=True)
SOFTCAP = (23.0, 5.0, 7.5, False)
STAGES = ("stage0", "stage1", "stage2")


def record_scale_targets():
    """The reference's synthetic targets: three batches of 16,384 Zipf-distributed GPT-2 ids
    (exponent 1.05) from numpy's generator with seed 1234."""
    ref = REFERENCE["record_scale"]
    rng = np.random.default_rng(int(ref["targets_seed"]))
    p = 1.0 / np.arange(1, 50258) ** float(ref["zipf_exponent"])
    p /= p.sum()
    return [torch.from_numpy(rng.choice(50257, size=16384, p=p)) for _ in range(3)]


@pytest.mark.parametrize("rank", [0, 5])
def test_candidate_sets_are_the_records_at_its_size(rank):
    """Vocabulary 50,304, 10,240 candidates, three steps of 16,384 targets, two of the record's
    8 ranks: the same sets (their sums, order-weighted sums and rank 0's first set whole), the
    same targets' positions and the same places in the sweep after each step."""
    ref = REFERENCE["record_scale"]
    sampler = CandidateSampler(int(ref["vocab"]), groups=8, device="cpu")
    want = ref[f"rank{rank}"]
    assert sampler.places[rank].item() == want["places"][0].item()
    for step, targets in enumerate(record_scale_targets()):
        got = sampler.build(targets[None], int(ref["P"]), first=rank)[0]
        assert got.shape == (int(ref["P"]),) and bool((got[1:] > got[:-1]).all())
        assert got.sum().item() == want["C_sum"][step].item()
        assert (got * torch.arange(got.numel())).sum().item() == want["C_weighted_sum"][step]
        if rank == 0 and step == 0:
            assert torch.equal(got.int(), want["C_step0"])
        assert positions_in(got, targets).sum().item() == want["TPOS_sum"][step].item()
        assert sampler.places[rank].item() == want["places"][step + 1].item()


def test_candidate_sets_and_positions_at_tiny_shapes():
    """Vocabulary 512, the record's rank 3 of 8, one group through three sets of 128, 128 and
    256: the sets, the targets' positions and the prefix targets' (-1 where not in the set;
    the record builds them only where the prefix weight is not 0)."""
    sampler = CandidateSampler(int(REFERENCE["vocab"]), groups=int(REFERENCE["world"]),
                               device="cpu")
    targets = REFERENCE["targets"]
    prefix = REFERENCE["prefix_table"][targets]
    for name in STAGES:
        ref = REFERENCE[name]
        got = sampler.build(targets[None], ref["P"], first=int(REFERENCE["rank"]))[0]
        assert torch.equal(got.int(), ref["C"]), name
        assert torch.equal(positions_in(got, targets).int(), ref["TPOS"]), name
        if ref["prefix_weight"]:
            assert torch.equal(positions_in(got, prefix).int(), ref["PPOS"]), name


@pytest.mark.parametrize("name", STAGES)
def test_sampled_loss_and_gradients_are_the_records(name):
    """The loss summed over the rows (multi-token and prefix terms with the stage's weights),
    and its gradients to the hidden rows and to the lm_head (nonzero on the set's rows only),
    against the record's loss path in float32 (autograd's gradients: the record's kernel adds
    the weights of absent tokens ahead to the last rows' gradients, ours does not)."""
    ref = REFERENCE[name]
    x = REFERENCE["x"].clone().requires_grad_()
    lm_head = REFERENCE["W"].t().contiguous().requires_grad_()
    weights = torch.cat([ref["mtp_weights"], torch.tensor([ref["prefix_weight"]])])
    targets, target_weights = prediction_targets(REFERENCE["targets"], weights,
                                                 REFERENCE["prefix_table"])
    candidates = ref["C"].long()[None]
    loss = sampled_loss(x, lm_head, targets, target_weights, candidates, SOFTCAP, fp8=False)
    rows = x.size(0)
    (loss * rows).backward()
    want = ref["sampled"]
    assert (loss * rows).item() == pytest.approx(want["loss"].item(), rel=1e-6)
    assert ref["full"]["loss"].item() > want["loss"].item() * 1.1  # the set's sum is smaller
    torch.testing.assert_close(x.grad, want["grad_x"], rtol=1e-5, atol=1e-6)
    grad_rows = lm_head.grad[candidates[0]]
    torch.testing.assert_close(grad_rows.t(), want["grad_W"], rtol=1e-5, atol=1e-6)
    outside = torch.ones(lm_head.size(0), dtype=torch.bool)
    outside[candidates[0]] = False
    assert lm_head.grad[outside].abs().max() == 0


def test_the_models_groups_end_their_tokens_ahead(tiny_model_config):
    """The model's sampled loss over G groups is the mean of each group's, whose tokens ahead
    stop at the group's end (the record's rank batch), not the next group's start."""
    gpt = make_gpt(dict(tiny_model_config, prefix_prediction=False))
    tokens = torch.randint(0, 50000, (128,), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens, torch.roll(tokens, -1)
    weights = torch.tensor([1.0, 0.5, 0.0])
    sampler = CandidateSampler(gpt.config.padded_vocab, groups=2, device="cpu")
    candidates = sampler.build(targets.view(2, 64), 256, first=0)
    got = gpt(inputs, targets, loss_weights=weights, candidates=candidates)
    hidden = gpt.hidden_states(inputs, document_ids(inputs))[0]
    want = []
    for g in range(2):
        part = slice(g * 64, (g + 1) * 64)
        group_targets, group_weights = prediction_targets(targets[part], weights, None)
        assert (group_targets[-1, 1] == -1) and (group_weights[-1, 1] == 0)
        want.append(sampled_loss(hidden[part], gpt.lm_head, group_targets, group_weights,
                                 candidates[g:g + 1], gpt.softcap_args, fp8=False))
    torch.testing.assert_close(got, torch.stack(want).mean())


def test_the_trunk_compiles_once_and_one_loss_graph_serves_every_set_size(tiny_model_config,
                                                                         monkeypatch):
    """As the trainer compiles the model (``compiled_forward``: fullgraph, dynamic=False) and
    marks the set size dynamic: the trunk traces once for the full and the sampled softmax,
    the sampled loss once for all the schedule's sizes, and both give the eager losses."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from layers.sampled import mark_set_size_dynamic

    counter = CompileCounterWithBackend("aot_eager")
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, **kw, backend=counter))
    gpt = make_gpt(dict(tiny_model_config, prefix_prediction=False))
    tokens = torch.randint(0, 50000, (128,), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens, torch.roll(tokens, -1)
    docs = document_ids(inputs)
    weights = torch.tensor([1.0, 0.5, 0.0])
    compiled = gpt.compiled_forward()
    torch.testing.assert_close(compiled(inputs, targets, docs, weights),
                               gpt(inputs, targets, docs, weights))
    sampler = CandidateSampler(gpt.config.padded_vocab, groups=2, device="cpu")
    for size in (256, 320, 448):
        candidates = sampler.build(targets.view(2, 64), size, first=0)
        want = gpt(inputs, targets, loss_weights=weights, candidates=candidates)
        got = compiled(inputs, targets, docs, weights, mark_set_size_dynamic(candidates))
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 3  # the trunk, the full loss, the sampled loss


def test_groups_built_together_are_the_groups_built_one_by_one():
    """Three groups at once, with different targets (one needing the fallback: its window
    holds too few new ids), against each built alone from the same place: the same sets and
    the same places after."""
    g = torch.Generator().manual_seed(2)
    targets = torch.stack([torch.randint(0, 500, (450,), generator=g),
                           torch.randint(0, 20, (450,), generator=g),
                           torch.randperm(512, generator=g)[:450]])
    together = CandidateSampler(512, groups=4, device="cpu")
    alone = CandidateSampler(512, groups=4, device="cpu")
    for size in (460, 512):  # 512: the third group's window holds too few (the fallback)
        got = together.build(targets, size, first=1)
        want = torch.cat([alone.build(targets[i:i + 1], size, first=1 + i) for i in range(3)])
        assert torch.equal(got, want), size
        assert torch.equal(together.places, alone.places)


def test_more_targets_than_candidates_is_refused():
    sampler = CandidateSampler(512, groups=1, device="cpu")
    with pytest.raises(RuntimeError, match="more distinct targets"):
        sampler.build(torch.arange(200)[None], 128, first=0)


def test_sampler_state_resumes_the_sweep():
    a = CandidateSampler(512, groups=2, device="cpu")
    targets = torch.randint(0, 500, (64,), generator=torch.Generator().manual_seed(1))
    a.build(targets[None], 128, first=1)
    b = CandidateSampler(512, groups=2, device="cpu")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.build(targets[None], 128, first=1), b.build(targets[None], 128, first=1))
