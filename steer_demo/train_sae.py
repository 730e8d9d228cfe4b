"""Stage 4: a TopK sparse autoencoder in plain torch.

Model (SAELens ``topk`` semantics, ``apply_b_dec_to_input=True``)::

    pre  = (x - b_dec) @ W_enc + b_enc            W_enc [d_in, d_sae]
    f    = relu(topk(pre, k))                      (all but the k largest are zero)
    xhat = f @ W_dec + b_dec                       W_dec [d_sae, d_in], rows unit-norm

Training: decoder rows random unit vectors, ``W_enc = W_dec.T``, ``b_enc = 0``, ``b_dec`` = per-dimension
median of the training data; Adam with warm-up and a linear decay at the end; after each step the
gradient parallel to the decoder rows is removed before the update and the rows are renormalised
after it. Dead latents (no activation for ``DEAD_AFTER_TOKENS`` training tokens) are trained through the
AuxK loss of Gao et al. (2024): the ``K_AUX`` largest dead pre-activations must reconstruct the residual.
The sparse decode uses ``embedding_bag`` (k rows per token), so only the encoder matmul is dense.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from .common import SEED, configure_threads, log


@dataclass
class TrainConfig:
    d_sae: int = 4608
    k: int = 32
    k_aux: int = 256
    aux_coef: float = 1 / 32
    batch_size: int = 1024
    epochs: int = 5
    lr: float = 2e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.3  # linear decay to 0 over the last 30% of steps
    dead_after_tokens: int = 50_000
    seed: int = SEED
    # bf16 autocast of the encoder matmul: off, since a CPU without bf16 arithmetic (AVX2 only) emulates it
    # ~19x slower (5.7 s against 0.30 s a step at one thread on an AMD EPYC: 64 min of training against 3.5)
    bf16_encoder: bool = False
    log_every_s: float = 5.0  # progress lines (wall clock); the recorded history is by step:
    history_every_steps: int = 25  # training-curve points every N steps (+ the last): same on every rebuild


def _torch():
    import torch

    return torch


class TopKSAE:
    """Parameters + encode/decode; a plain container around four tensors (no nn.Module magic needed)."""

    def __init__(self, d_in: int, d_sae: int, k: int, gen, b_dec_init):
        torch = _torch()
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_enc = w_dec.t().clone().contiguous().requires_grad_()
        self.W_dec = w_dec.requires_grad_()
        self.b_enc = torch.zeros(d_sae, requires_grad=True)
        self.b_dec = b_dec_init.clone().float().requires_grad_()
        self.k = k

    def params(self):
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    def pre_acts(self, x):
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x, bf16: bool = False):
        """(values, indices) of the k kept latents; values are relu'd (may contain zeros)."""
        torch = _torch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pre = self.pre_acts(x)
        pre = pre.float()
        vals, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        return vals.relu(), idx, pre

    def decode(self, vals, idx):
        torch = _torch()
        return (
            torch.nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
            + self.b_dec
        )

    def state_dict(self) -> dict:
        return {
            "W_enc": self.W_enc.detach().contiguous(),
            "W_dec": self.W_dec.detach().contiguous(),
            "b_enc": self.b_enc.detach().contiguous(),
            "b_dec": self.b_dec.detach().contiguous(),
        }


def train(x_train, cfg: TrainConfig) -> tuple[TopKSAE, dict]:
    """Train on ``x_train`` [N, d_in] (float32). Returns the SAE and training statistics."""
    torch = _torch()
    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(cfg.seed)
    n, d_in = x_train.shape
    sample = x_train[torch.randperm(n, generator=gen)[:32768]]
    b_dec0 = sample.median(dim=0).values
    sae = TopKSAE(d_in, cfg.d_sae, cfg.k, gen, b_dec0)
    opt = torch.optim.Adam(sae.params(), lr=cfg.lr, betas=(0.9, 0.999))

    steps_per_epoch = n // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    decay_start = int(total_steps * (1 - cfg.decay_fraction))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if step >= decay_start:
            return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
        return cfg.lr

    dead_after_steps = max(1, math.ceil(cfg.dead_after_tokens / cfg.batch_size))
    steps_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    fired_last_epoch = torch.zeros(cfg.d_sae, dtype=torch.bool)
    # variance of the data around its mean, per token: normaliser for the logged/aux losses
    data_var = (sample - sample.mean(0)).pow(2).sum(-1).mean()
    log(
        f"  training TopK SAE d_in={d_in} d_sae={cfg.d_sae} k={cfg.k} on {n} tokens: "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps of {cfg.batch_size}"
    )

    step = 0
    last_log = time.monotonic()
    hist: list[dict] = []
    run_mse = run_ev = run_aux = 0.0
    run_n = 0
    h_mse = h_ev = h_aux = 0.0  # history accumulators (by step, independent of the wall-clock log)
    h_n = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        if epoch == cfg.epochs - 1:
            fired_last_epoch.zero_()
        for s in range(steps_per_epoch):
            x = x_train[perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)

            if step % 50 == 0:
                configure_threads()
            vals, idx, pre = sae.encode(x, bf16=cfg.bf16_encoder)
            xhat = sae.decode(vals, idx)
            err = x - xhat
            mse = err.pow(2).sum(-1).mean()
            loss = mse

            with torch.no_grad():
                fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
                fired[idx[vals > 0]] = True
                steps_since_fired += 1
                steps_since_fired[fired] = 0
                fired_last_epoch |= fired
                dead = steps_since_fired >= dead_after_steps
                n_dead = int(dead.sum())

            aux = torch.zeros(())
            if n_dead > 0:
                k_aux = min(cfg.k_aux, n_dead)
                aux_pre = pre.masked_fill(~dead, float("-inf"))
                a_vals, a_idx = torch.topk(aux_pre, k_aux, dim=-1, sorted=False)
                a_vals = a_vals.relu()
                e_hat = torch.nn.functional.embedding_bag(
                    a_idx, sae.W_dec, per_sample_weights=a_vals, mode="sum"
                )
                aux = (err.detach() - e_hat).pow(2).sum(-1).mean() / data_var
                aux = torch.nan_to_num(aux, nan=0.0)
                loss = loss + cfg.aux_coef * aux * data_var

            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                # remove the gradient component parallel to each (unit) decoder row
                g = sae.W_dec.grad
                g -= (g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
            opt.step()
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

            with torch.no_grad():
                f_mse, f_ev, f_aux = float(mse), 1.0 - float(mse / data_var), float(aux)
                run_mse += f_mse
                run_ev += f_ev
                run_aux += f_aux
                run_n += 1
                h_mse += f_mse
                h_ev += f_ev
                h_aux += f_aux
                h_n += 1
            step += 1
            now = time.monotonic()
            if step % cfg.history_every_steps == 0 or step == total_steps:
                hist.append(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "mse": round(h_mse / h_n, 3),
                        "ev": round(h_ev / h_n, 4),
                        "aux": round(h_aux / h_n, 4),
                        "dead": n_dead,
                        "lr": lr_at(step - 1),
                        "elapsed_s": round(now - t0, 1),  # left out of quality.json
                    }
                )
                h_mse = h_ev = h_aux = 0.0
                h_n = 0
            if now - last_log >= cfg.log_every_s or step == total_steps:
                last_log = now
                log(
                    f"  [train] step {step}/{total_steps} epoch {epoch + 1} mse {run_mse / run_n:.2f} "
                    f"EV {run_ev / run_n:.4f} aux {run_aux / run_n:.3f} dead {n_dead} lr {lr_at(step - 1):.2e} "
                    f"{now - t0:.1f}s elapsed"
                )
                run_mse = run_ev = run_aux = 0.0
                run_n = 0

    stats = {
        "config": asdict(cfg),
        "steps": total_steps,
        "train_tokens": n,
        "train_seconds": round(time.monotonic() - t0, 1),
        "dead_at_end_of_training": int((steps_since_fired >= dead_after_steps).sum()),
        "never_fired_in_last_epoch": int((~fired_last_epoch).sum()),
        "history": hist,
    }
    return sae, stats
