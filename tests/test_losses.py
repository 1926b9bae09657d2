"""Exact math of losses.py: hand-computed values, identities, analytic gradients, float64 references."""
import math

import pytest
import torch

from losses import dpo_loss, length_normalized_nll, rpo_loss, sequence_logps


def four(*values, dtype=torch.float32, grad=False):
    return [torch.tensor(v, dtype=dtype, requires_grad=grad) for v in values]


def test_dpo_hand_computed():
    # margin = β[(−1 − −2) − (−3 − −1)] = 0.5·[1 + 2] = 1.5 → loss = −log σ(1.5) = log(1 + e^−1.5)
    pc, pr, rc, rr = four([-1.0], [-3.0], [-2.0], [-1.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-7)
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-1.0)


def test_policy_equals_reference_gives_log2_and_zero_rewards():
    logps = torch.randn(5) * 30
    other = torch.randn(5) * 30
    losses, cr, rj = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.all(cr == 0) and torch.all(rj == 0)


def test_rpo_hand_computed():
    # DPO part: β=0.1, margin 0.1·[(−10+12) − (−20+18)] = 0.4; NLL: 10/5 = 2; α = 0.5 → log(1+e^−0.4) + 1
    pc, pr, rc, rr = four([-10.0], [-20.0], [-12.0], [-18.0])
    losses, cr, rj, dpo, nll = rpo_loss(pc, pr, rc, rr, torch.tensor([5]), beta=0.1, alpha=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.4)) + 1.0, abs=1e-6)
    assert cr.item() == pytest.approx(0.2) and rj.item() == pytest.approx(-0.2)
    # the two terms it logs: DPO alone, and the NLL term before α
    assert dpo.item() == pytest.approx(math.log1p(math.exp(-0.4)), abs=1e-6) and nll.item() == pytest.approx(2.0)


def test_nll_is_per_sequence_length_normalised():
    nll = length_normalized_nll(torch.tensor([-10.0, -10.0]), torch.tensor([2, 10]))
    assert torch.allclose(nll, torch.tensor([5.0, 1.0]))  # a batch token-mean (TRL) would give 20/12 for both


def test_alpha_zero_is_exactly_dpo():
    args = [torch.randn(7) * 50 for _ in range(4)]
    rpo = rpo_loss(*args, torch.randint(1, 100, (7,)), beta=0.1, alpha=0.0)
    dpo = dpo_loss(*args, beta=0.1)
    for a, b in zip(rpo[:3], dpo):
        assert torch.equal(a, b)
    assert torch.equal(rpo[3], dpo[0])


def test_rewards_are_detached():
    pc, pr, rc, rr = four([-1.0], [-2.0], [-1.5], [-1.5], grad=True)
    _, cr, rj, _, _ = rpo_loss(pc, pr, rc, rr, torch.tensor([3]), beta=0.1, alpha=1.0)
    assert not cr.requires_grad and not rj.requires_grad


def test_gradients_equal_analytic():
    beta, alpha, length = 0.3, 0.7, 4.0
    pc, pr = four([-5.0], [-6.0], grad=True)
    rc, rr = four([-5.5], [-5.0])
    losses = rpo_loss(pc, pr, rc, rr, torch.tensor([4]), beta=beta, alpha=alpha)[0]
    losses.sum().backward()
    z = beta * ((-5.0 + 5.5) - (-6.0 + 5.0))
    s = 1 / (1 + math.exp(z))  # σ(−z) = −d/dz log σ(z)
    assert pc.grad.item() == pytest.approx(-beta * s - alpha / length, rel=1e-6)
    assert pr.grad.item() == pytest.approx(beta * s, rel=1e-6)


def test_float32_equals_float64():
    torch.manual_seed(0)
    args64 = [torch.randn(64, dtype=torch.float64) * 100 - 200 for _ in range(4)]
    lengths = torch.randint(1, 300, (64,))
    out32 = rpo_loss(*[a.float() for a in args64], lengths, beta=0.1, alpha=1.0)
    out64 = rpo_loss(*args64, lengths, beta=0.1, alpha=1.0)
    for a, b in zip(out32, out64):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("margin", [1e4, -1e4, 1e6, -1e6])
def test_extreme_margins_stay_finite(margin):
    pc, pr, rc, rr = four([margin], [0.0], [0.0], [0.0], grad=True)
    losses = rpo_loss(pc, pr, rc, rr, torch.tensor([10]), beta=1.0, alpha=1.0)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    expected = max(-margin, 0.0) - margin / 10  # softplus(−m) ≈ max(−m, 0), NLL = −m/10
    assert losses.item() == pytest.approx(expected, rel=1e-5)


def per_token_loop(logits, labels, ignore_index=-100):
    logps, lengths = [], []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(1, logits.shape[1]):
            if labels[b, t] != ignore_index:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
                count += 1
        logps.append(total)
        lengths.append(count)
    return torch.tensor(logps, dtype=torch.float64), torch.tensor(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_equals_per_token_loop(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, 50) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    labels[1, 6:] = -100
    labels[2, :] = -100
    logps, lengths = sequence_logps(logits, labels)
    want, want_lengths = per_token_loop(logits.float(), labels)
    assert logps.dtype == torch.float32
    assert torch.equal(lengths, want_lengths)
    assert torch.allclose(logps.double(), want, atol=1e-4)
    assert logps[2] == 0


def test_sequence_logps_gradient_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = -100
    sequence_logps(logits, labels)[0].sum().backward()
    mine = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (ref * (labels[:, 1:] != -100)).sum().backward()
    assert torch.allclose(mine, logits.grad, atol=1e-6)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def padded_logps(model, sequences, prompt_len, side, width):
    """Score each sequence's tokens after `prompt_len`, padded on `side` to `width` tokens, in one batch."""
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[i, start:start + len(seq)] = torch.tensor(seq)
        mask[i, start:start + len(seq)] = 1
        labels[i, start + prompt_len:start + len(seq)] = torch.tensor(seq[prompt_len:])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    return sequence_logps(logits, labels)[0]


def test_sequence_logp_same_alone_padded_and_batched():
    model = tiny_llama()
    seq = [5, 17, 3, 44, 8, 21, 9]
    longer = [4, 4, 60, 2, 33, 12, 80, 71, 6, 5, 40, 11]
    alone = padded_logps(model, [seq], 3, "right", len(seq))[0]
    for side in ("right", "left"):
        assert torch.allclose(padded_logps(model, [seq], 3, side, 15)[0], alone, atol=1e-5)
        assert torch.allclose(padded_logps(model, [longer, seq], 3, side, 15)[1], alone, atol=1e-5)
