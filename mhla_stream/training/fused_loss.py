"""Cross-entropy fused with the LM head, chunk by chunk, so the full [tokens, vocab] logits never exist.

For the 340M shape (batch 8 x 2048 tokens, vocab 32000) the plain path holds 16k x 32k logits in
bf16 plus their fp32 copy and the fp32 softmax gradient: about 5 GiB. Here each chunk's logits are
formed, turned into the loss and into the gradients for the hidden states and the head weight, and
freed; the backward pass only scales the stored gradients by the incoming scalar.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the plain path's head matmul would run in (autocast's, when it is on)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, compute_dtype):
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax in fp32 at least, fp64 stays fp64
        count = valid.sum().clamp_min(1).to(acc)
        w = weight.to(compute_dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_tokens):
            h = hidden[s:s + chunk_tokens].to(compute_dtype)
            t = targets[s:s + chunk_tokens]
            ok = valid[s:s + chunk_tokens]
            logits = (h @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = torch.where(ok, t, torch.zeros_like(t))
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * ok).sum()
            if need_h or need_w:
                # d loss / d logits = (softmax - onehot) / count, zero on ignored rows; reuse the buffer
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
                grad.mul_((ok.to(grad.dtype) / count)[:, None])
                grad = grad.to(compute_dtype)
                if need_h:
                    grad_hidden[s:s + chunk_tokens] = (grad @ w).to(hidden.dtype)
                if need_w:
                    grad_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (``-100`` ignored), equal in value
    and gradients to ``F.cross_entropy(F.linear(hidden, weight).float(), targets)``.

    ``hidden`` is [..., H] and ``targets`` the matching [...]; ``weight`` is the head's [vocab, H].
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head's {weight.shape[1]}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    compute_dtype = _compute_dtype(hidden)
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                          chunk_tokens, compute_dtype)
