"""Per-layer banks of steering directions, resident on the worker's device.

A layer's bank stacks the decoder rows of every SAE at that layer, then its raw vectors, into one table, so
that a token's operations are just row indices into it (no dense vector per request config). Clamp and scale
need the feature's activation, so each row also carries its encoder column and per-feature constants.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from steer_plugin.sae.model import SparseAutoencoder

# Columns of LayerBank.params (float32 [N, NUM_PARAMS]); see feature_activations() in delta.py.
IN_SCALE, GATE_BIAS, MAG_MULT, MAG_BIAS, THRESHOLD, COLSUM, CENTER, NORM_KIND, DIR_SCALE, INV_DIR_NORM = (
    range(10)
)
NUM_PARAMS = 10
NORM_KINDS = {"none": 0, "layer_norm": 1, "constant_norm_rescale": 2}


class BankEntry(NamedTuple):
    """Where one SAE or vector sits in its layer's bank."""

    kind: str  # "feature" or "vector"
    source: str
    offset: int
    size: int
    revision: str = ""  # loaded at runtime: the load's revision (requests name it, see ResolvedOp.revision)


class LayerBank:
    """Directions [N, d], encoder rows [N, d] and per-row constants [N, NUM_PARAMS] for one layer."""

    def __init__(
        self, layer: int, dec: torch.Tensor, enc: torch.Tensor, params: torch.Tensor, entries: list[BankEntry]
    ):
        self.layer = layer
        self.dec = dec  # [N, d_model]
        self.enc = enc  # [N, d_model]  (W_enc columns as rows; zero rows for vectors)
        self.params = params  # [N, NUM_PARAMS] float32
        self.entries = {(e.kind, e.source): e for e in entries}
        scratch = self.entries.get(("scratch", "inline"))
        # Rows for requests' inline vectors: each live one holds a row from its slot's take to its release.
        self._free_scratch = (
            list(range(scratch.offset, scratch.offset + scratch.size))[::-1] if scratch else []
        )
        reserved = self.entries.get(("reserved", "runtime"))
        # Rows for SAEs and vectors loaded while serving: free (offset, size) ranges, sorted by offset.
        self._free_reserved = [(reserved.offset, reserved.size)] if reserved else []

    @property
    def num_rows(self) -> int:
        return self.dec.shape[0]

    def row(self, kind: str, source: str, index: int, revision: str = "") -> int:
        entry = self.entries.get((kind, source))
        if entry is None:
            raise KeyError(f"layer {self.layer} holds no {kind} {source!r}")
        if entry.revision != revision:  # resolved against a load since undone (and maybe redone)
            raise KeyError(
                f"{kind} {source!r} is revision {entry.revision!r}, the request names {revision!r}"
            )
        if not 0 <= index < entry.size:
            raise IndexError(f"{kind} {source!r} has no index {index}")
        return entry.offset + index

    def feature_bytes(self, sae_id: str) -> int:
        """Bytes an SAE's features take in this bank (a decoder and an encoder row each)."""
        return self.entries[("feature", sae_id)].size * 2 * self.dec.shape[1] * self.dec.element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dec, self.enc, self.params))

    def take_scratch(self, vector: torch.Tensor) -> int:
        """Write an inline vector [d] into a free scratch row (in place: no buffer moves); ScratchFull if none."""
        if not self._free_scratch:
            raise ScratchFull(f"layer {self.layer}: no free row for an inline vector")
        row = self._free_scratch.pop()
        self.dec[row] = vector.to(device=self.dec.device, dtype=self.dec.dtype)
        self.params[row] = vector_params(vector.float()).to(self.params.device)[0]
        return row

    def free_scratch(self, row: int) -> None:
        self.dec[row] = 0
        self._free_scratch.append(row)

    def free_reserved_rows(self) -> int:
        return sum(size for _, size in self._free_reserved)

    def largest_free_range(self) -> int:
        return max((size for _, size in self._free_reserved), default=0)

    def place(
        self,
        kind: str,
        source: str,
        revision: str,
        dec: torch.Tensor,
        enc: torch.Tensor,
        params: torch.Tensor,
    ) -> BankEntry:
        """Write n rows (dec [n, d], enc [n, d], params [n, P]) into the first free reserved range that holds
        them, in place (no buffer moves: captured graphs keep their addresses); BankFull if none does."""
        n = dec.shape[0]
        fit = next((i for i, (_, size) in enumerate(self._free_reserved) if size >= n), None)
        if fit is None:
            raise BankFull(
                f"layer {self.layer}: {n} rows needed, the largest free reserved range holds "
                f"{self.largest_free_range()} ({self.free_reserved_rows()} free in all; raise "
                "runtime.rows_per_layer)"
            )
        offset, size = self._free_reserved[fit]
        if size == n:
            del self._free_reserved[fit]
        else:
            self._free_reserved[fit] = (offset + n, size - n)
        rows = slice(offset, offset + n)
        self.dec[rows] = dec.to(device=self.dec.device, dtype=self.dec.dtype)
        self.enc[rows] = enc.to(device=self.enc.device, dtype=self.enc.dtype)
        self.params[rows] = params.to(device=self.params.device, dtype=self.params.dtype)
        # Read back: the rows a request will name hold exactly these values (the runtime self-check).
        if not torch.equal(self.dec[rows], dec.to(device=self.dec.device, dtype=self.dec.dtype)):
            self._clear_rows(offset, n)
            raise RuntimeError(
                f"layer {self.layer}: bank rows {offset}..{offset + n - 1} did not take the write"
            )
        entry = BankEntry(kind, source, offset, n, revision)
        self.entries[(kind, source)] = entry
        return entry

    def retire(self, kind: str, source: str) -> BankEntry | None:
        """Forget an entry loaded at runtime: no new plan can name it. Its rows stay as they are until
        release() (running plans may still read them)."""
        entry = self.entries.get((kind, source))
        if entry is None or not entry.revision:
            return None
        del self.entries[(kind, source)]
        return entry

    def release(self, entry: BankEntry) -> None:
        """Zero a retired entry's rows and give them back to the reserved free ranges."""
        self._clear_rows(entry.offset, entry.size)
        ranges = sorted([*self._free_reserved, (entry.offset, entry.size)])
        merged: list[tuple[int, int]] = []
        for offset, size in ranges:
            if merged and merged[-1][0] + merged[-1][1] == offset:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((offset, size))
        self._free_reserved = merged

    def _clear_rows(self, offset: int, n: int) -> None:
        rows = slice(offset, offset + n)
        self.dec[rows] = 0
        self.enc[rows] = 0
        self.params[rows] = 0


class BankFull(RuntimeError):
    """No free reserved range of a layer holds the SAE or vector being loaded."""


class ScratchFull(RuntimeError):
    """Every scratch row of a layer holds a live request's inline vector."""


def sae_params(sae: SparseAutoencoder) -> torch.Tensor:
    """Per-feature constants that let one feature's activation be computed from its encoder row alone."""
    w_enc = sae.W_enc.float()  # [d_in, d_sae]
    b_dec_dot = (sae.b_dec.float() @ w_enc) if sae.apply_b_dec_to_input else torch.zeros(sae.d_sae)  # [d_sae]
    params = torch.zeros(sae.d_sae, NUM_PARAMS, dtype=torch.float32, device=w_enc.device)
    params[:, IN_SCALE] = sae.in_scale
    if sae.architecture == "gated":
        mag_mult = torch.exp(sae.r_mag.float())
        params[:, GATE_BIAS] = sae.b_gate.float() - b_dec_dot
        params[:, MAG_MULT] = mag_mult
        params[:, MAG_BIAS] = sae.b_mag.float() - mag_mult * b_dec_dot
    else:
        params[:, GATE_BIAS] = sae.b_enc.float() - b_dec_dot
        params[:, MAG_MULT] = 1.0
        params[:, MAG_BIAS] = sae.b_enc.float() - b_dec_dot
    if sae.architecture in ("jumprelu", "batchtopk"):
        params[:, THRESHOLD] = sae.threshold.float()
    # relu, topk and gated gate at 0. Under topk a clamp reads relu(pre_i): top-k membership is not checked,
    # since that needs the full encode (see README, "clamp under topk").
    params[:, COLSUM] = w_enc.sum(dim=0)
    params[:, CENTER] = float(sae.center_input or sae.per_token_norm == "layer_norm")
    params[:, NORM_KIND] = NORM_KINDS[sae.per_token_norm]
    params[:, DIR_SCALE] = sae.out_scale
    params[:, INV_DIR_NORM] = 1.0 / sae.W_dec.float().norm(dim=-1).clamp_min(1e-12)
    return params


def vector_params(vector: torch.Tensor) -> torch.Tensor:
    params = torch.zeros(1, NUM_PARAMS, dtype=torch.float32, device=vector.device)
    params[:, DIR_SCALE] = 1.0
    params[:, INV_DIR_NORM] = 1.0 / vector.float().norm().clamp_min(1e-12)
    return params


def build_layer_bank(
    layer: int,
    saes: list[tuple[str, SparseAutoencoder]],
    vectors: list[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    scratch_rows: int = 0,
    d_model: int | None = None,
    reserved_rows: int = 0,
) -> LayerBank:
    """Stack the SAEs and vectors of one layer, then `scratch_rows` empty rows for inline vectors and
    `reserved_rows` for SAEs and vectors loaded while serving. The source tensors can be dropped afterwards."""
    decs, encs, params, entries = [], [], [], []
    offset = 0
    for sae_id, sae in saes:
        decs.append(sae.W_dec.to(device=device, dtype=dtype))
        encs.append(sae.W_enc.t().to(device=device, dtype=dtype))
        params.append(sae_params(sae).to(device))
        entries.append(BankEntry("feature", sae_id, offset, sae.d_sae))
        offset += sae.d_sae
    for vec_id, vec in vectors:
        decs.append(vec.reshape(1, -1).to(device=device, dtype=dtype))
        encs.append(torch.zeros(1, vec.numel(), device=device, dtype=dtype))
        params.append(vector_params(vec).to(device))
        entries.append(BankEntry("vector", vec_id, offset, 1))
        offset += 1
    d_model = decs[0].shape[1] if decs else d_model
    # Empty rows, written while serving: inline vectors (scratch), runtime loads (reserved).
    for kind, source, rows in (("scratch", "inline", scratch_rows), ("reserved", "runtime", reserved_rows)):
        if rows:
            decs.append(torch.zeros(rows, d_model, device=device, dtype=dtype))
            encs.append(torch.zeros(rows, d_model, device=device, dtype=dtype))
            params.append(torch.zeros(rows, NUM_PARAMS, device=device))
            entries.append(BankEntry(kind, source, offset, rows))
            offset += rows
    # Last row: a unit vector along the first axis, steered only by the start-up self-test.
    probe = torch.zeros(d_model)
    probe[0] = 1.0
    decs.append(probe[None].to(device=device, dtype=dtype))
    encs.append(torch.zeros(1, d_model, device=device, dtype=dtype))
    params.append(vector_params(probe).to(device))
    entries.append(BankEntry("selftest", "selftest", offset, 1))
    dims = {t.shape[1] for t in decs}
    if len(dims) != 1:
        raise ValueError(f"layer {layer}: SAEs and vectors disagree on d_model: {sorted(dims)}")
    dec = torch.cat(decs).contiguous()
    enc = torch.cat(encs).contiguous()
    par = torch.cat(params).contiguous()
    if not (torch.isfinite(dec).all() and torch.isfinite(enc).all() and torch.isfinite(par).all()):
        raise ValueError(f"layer {layer}: non-finite values in the steering bank")
    return LayerBank(layer, dec, enc, par, entries)
