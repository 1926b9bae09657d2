"""How many rows a stage runs at once, from what a row costs on the model's own config and the memory the stage may
use (an out-of-memory error is answered by halving the rows: `resume.in_chunks`).

    costs(model)         bytes a row costs: its KV cache per token (every layer's keys and values), a decode step,
                         a token of a forward pass with or without gradients
    available(gib, m)    bytes a stage may still use: --memory-budget GiB (or, on a GPU, what it reports free less a
                         margin) less what is resident; None on a CPU without a budget (no plan: the caps alone)
    sampling_rows, scoring_rows   the most rows whose peak fits, at most the batch-size flag

The cache figures are exact arithmetic on the config (layers × 2 × key-value heads × head size × bytes of the
compute dtype); the activations are estimates of the tensors one step holds at its peak. The guard catches what the
estimates miss. Torch only, no model code: tools/bench.py prints the plan of the 7B presets from a config alone.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

GiB = 2**30
MARGIN = GiB  # kept free on a GPU whose free memory is the budget: allocator fragmentation, kernel workspaces


@dataclass(frozen=True)
class Costs:
    """Bytes, for one row (a sampled sequence, or one response of a pair) of a model."""
    cache_token: int    # keys and values of every layer for one token
    forward_token: int  # a token of a forward pass without gradients (one layer's intermediates alive at a time)
    train_token: int    # a token of a forward pass whose backward pass follows (what autograd keeps)
    logit: int          # one logit (4 when the output head computes in float32)
    vocab: int
    layers: int
    workspace: int      # once per forward: one layer's dequantised 4-bit weight and its product

    @property
    def step_row(self) -> int:
        """A decode step of one row: a token's forward pass, its logits, the sampler's float32 copies of them."""
        return self.forward_token + self.vocab * (self.logit + 12)


def costs_from_config(config, dtype_bytes: int, logit_bytes: int, checkpointing: bool) -> Costs:
    """Costs of a transformers config (Llama-like: hidden, intermediate, key-value heads, layers, vocabulary)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = (10 * hidden + 4 * intermediate) * dtype_bytes  # what one layer's backward needs of its forward
    return Costs(cache_token=layers * 2 * kv_heads * head_dim * dtype_bytes,
                 forward_token=(8 * hidden + 3 * intermediate) * dtype_bytes,
                 # checkpointing keeps each layer's input and recomputes one layer at a time
                 train_token=layers * hidden * dtype_bytes + per_layer if checkpointing else layers * per_layer,
                 logit=logit_bytes, vocab=config.vocab_size, layers=layers,
                 workspace=2 * hidden * intermediate * dtype_bytes)


def costs(model, checkpointing: bool = False) -> Costs:
    """Costs of a loaded model: its activations in the dtype of its input embeddings, its logits in its head's."""
    return costs_from_config(model.config, model.get_input_embeddings().weight.element_size(),
                             model.get_output_embeddings().weight.element_size(), checkpointing)


def resident(model) -> int:
    """Bytes of the model's parameters and buffers (a 4-bit weight counts its packed bytes)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def available(budget_gib: float, model) -> int | None:
    """Bytes a stage may still use on the model's device: the budget (GiB, the whole process's) less what is held
    now; with no budget, on a GPU what it reports free (with what PyTorch holds unused) less MARGIN, and on a CPU
    None: no plan."""
    device = model.device
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
        if budget_gib:
            return int(budget_gib * GiB) - held
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - held - MARGIN
    return int(budget_gib * GiB) - resident(model) if budget_gib else None


def largest(peak: Callable[[int], int], space: int | None, cap: int) -> int:
    """The most rows r ≤ cap with peak(r) ≤ space (peak grows with r); cap without a plan; at least 1 (then, if even
    one row does not fit, the out-of-memory guard says so)."""
    if space is None or peak(cap) <= space:
        return cap
    low, high = 1, cap  # peak(high) > space
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= space else (low, middle)
    return low


def sampling_peak(c: Costs, rows: int, prompt: int, new: int, n: int) -> int:
    """Peak bytes of sampling `rows` rows, n per prompt, of prompt + new tokens: the prefill of the distinct prompts,
    then each row's copy of its prompt's cache (the copies are counted: a row holds its own), then every row at its
    last token with a decode step's activations (and one layer's cache copied as it grows)."""
    distinct = min(rows, -(-rows // n) + 1)  # one prompt's samples may straddle two batches
    prefill = distinct * prompt * (c.cache_token + c.forward_token) + distinct * c.vocab * c.logit
    copies = (distinct + rows) * prompt * c.cache_token
    length = prompt + new
    decode = rows * length * c.cache_token + rows * c.step_row + rows * length * c.cache_token // c.layers
    return max(prefill, copies, decode) + c.workspace


def sampling_rows(c: Costs, space: int | None, prompt: int, new: int, n: int, cap: int) -> int:
    return largest(lambda r: sampling_peak(c, r, prompt, new, n), space, cap)


def scoring_peak(c: Costs, pairs: int, prompt: int, response: int, grad: bool, shared: bool) -> int:
    """Peak bytes of scoring `pairs` pairs (prompt + two responses of up to `response` tokens): the prompt once on
    a KV cache that both responses read (`shared`), or each response after its own copy of the prompt; with
    `grad`, what the backward pass keeps and the logits' gradient."""
    if shared:
        tokens = pairs * prompt + 2 * pairs * response
        cache = 3 * pairs * prompt * c.cache_token + 2 * pairs * response * c.cache_token
    else:
        tokens, cache = 2 * pairs * (prompt + response), 0
    logits = 2 * pairs * (response + 1) * c.vocab * c.logit * (2 if grad else 1)
    logsumexp = 2 * (response + 1) * c.vocab * 4  # `losses.sequence_logps`: one row's float32 copy at a time
    return cache + tokens * (c.train_token if grad else c.forward_token) + logits + logsumexp + c.workspace


def scoring_rows(c: Costs, space: int | None, prompt: int, response: int, cap: int, grad: bool, shared: bool) -> int:
    return largest(lambda b: scoring_peak(c, b, prompt, response, grad, shared), space, cap)


def plan_line(label: str, rows: int, cap: int, space: int | None, peak: int, what: str) -> str:
    """The one line a stage prints about its plan (`what`: "row", "pair")."""
    what = what if rows == 1 else what + "s"
    if space is None:
        return f"{label}: {rows} {what} at once (the batch-size cap; no memory plan on a CPU without --memory-budget)"
    return (f"{label}: {rows} {what} at once, planned peak {peak / GiB:.2f} of {space / GiB:.2f} GiB available"
            + (" (the batch-size cap)" if rows == cap else ""))
