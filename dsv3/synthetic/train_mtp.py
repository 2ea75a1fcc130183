"""Make a random checkpoint's MTP layer useful: train it (main model frozen) on the main model's own greedy text.

A random checkpoint's MTP layer drafts noise, so speculative decoding on it shows nothing. This fits the MTP
layer to what it is for: from the main model's final hidden state at t and the embedding of token t+1,
predict token t+2 of the main model's own greedy continuations. CPU, fp32, a few hundred Adam steps.

The target is the main model's whole distribution over token t+2 (the KL divergence from it), not only its
greedy token: a random model's next-token distribution is nearly flat, so its greedy choice hangs on small
logit gaps that one token per position teaches poorly. Measured on the demo model, 800 steps, acceptance of
the main model's greedy token on unseen prompts: greedy-token cross-entropy on 64 sequences 5%, on 1024 7%;
the distribution on 1024 sequences 10-11%.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.names import demo_to_model, expected_hf_tensors, hf_to_demo


def _trainable(model) -> dict[str, torch.Tensor]:
    """Every buffer as a fresh normal tensor (loaded ones are inference tensors, which autograd cannot save);
    the MTP module's floating-point ones require grad and are returned by name."""
    params = {}
    for name, buf in list(model.named_buffers()):
        if buf is None:
            continue
        prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        module = model.get_submodule(prefix) if prefix else model
        train = name.startswith("mtp.") and buf.is_floating_point()
        t = buf.detach().clone()
        if train:
            t = t.float().requires_grad_(True)
            params[name] = t
        setattr(module, leaf, t)
    return params


def _data(engine, n_seq: int, length: int, seed: int) -> torch.Tensor:
    """[n_seq, length] token ids: short random prompts and the main model's greedy continuation of each."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.cfg.vocab_size
    prompts = [torch.randint(1, vocab, (4,), generator=g).tolist() for _ in range(n_seq)]
    outs = engine.generate(prompts, max_new_tokens=length - 4)
    seqs = [(p + o + [0] * length)[:length] for p, o in zip(prompts, outs)]
    return torch.tensor(seqs)


#: continuations trained on by default (2 s to generate on the tiny model; fewer overfit: see the top)
N_SEQ = 1024


def train_mtp(engine, steps: int = 300, n_seq: int = N_SEQ, length: int = 48, lr: float = 3e-3, seed: int = 0,
              progress=None) -> dict[str, torch.Tensor]:
    """Train engine's MTP layer in place; returns {HF checkpoint name: fp32 tensor} for the layer's tensors."""
    model = engine.model
    ids = _data(engine, n_seq, length, seed)  # [N, S]
    with torch.inference_mode():
        hidden, _ = model.hidden(ids)
    hidden = hidden.clone()  # [N, S, D]: normal tensors for autograd
    params = _trainable(model)
    mtp = model.mtp[0]
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        rows = torch.randint(0, ids.shape[0], (min(64, ids.shape[0]),), generator=g)
        x_ids, h = ids[rows], hidden[rows]
        step = model.step(len(rows), ids.shape[1] - 1, 0, None)
        x = mtp.eh_proj(torch.cat([mtp.enorm(model.embed(x_ids[:, 1:])), mtp.hnorm(h[:, :-1])], dim=-1))
        logits = model.logits(mtp.head_norm(mtp.block(x, step)))  # [n, S-1, V]: position t drafts token t+2
        with torch.no_grad():
            target = F.log_softmax(model.logits(h[:, 1:]), dim=-1)  # [n, S-1, V]: the main model's, at t+1
        loss = F.kl_div(F.log_softmax(logits, dim=-1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                        reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(i + 1, steps, loss.item())
    layer = model.cfg.num_hidden_layers
    out = {}
    for hf_name, spec in expected_hf_tensors(model.cfg, fp8=False).items():
        if not hf_name.startswith(f"model.layers.{layer}.") or spec.role == "scale":
            continue
        target = demo_to_model(hf_to_demo(hf_name), layer)
        if target is None:  # the MTP layer's copies of the embedding and head: the main model's
            continue
        name, expert = target
        t = params[name].detach()
        out[hf_name] = (t[expert] if expert is not None else t).float().clone()  # experts stacked [E, ...]
    return out
