"""Quantized HF checkpoints, read as they were written: config.json's `quantization_config` picks the format,
and each quantized linear layer `<m>` is handed to the loader as one `HostQuant` under its dense name
`<m>.weight`, in the checkpoint's own numbers (values, scales, zero points), output rows first.

Formats (what vLLM loads for the same checkpoints):
  gptq                qweight int32 [I * bits / 32, O] packed along I, lowest bits first; qzeros int32
                      [groups, O * bits / 32] packed along O; scales [groups, O]; g_idx [I] (act-order).
                      checkpoint_format "gptq" (v1) stores zero - 1; "gptq_v2" the zero itself.
  awq (GEMM)          qweight int32 [I, O / 8] packed along O in the order 0 2 4 6 1 3 5 7; qzeros likewise;
                      scales [groups, O]; zeros stored as they are.
  auto-round          its own format: packing_format "auto_round:auto_gptq" (GPTQ v1 layout) or
                      "auto_round:auto_awq" (AWQ layout); its gptq / awq exports are read as those.
  compressed-tensors  pack-quantized: weight_packed int32 [O, I * bits / 32] packed along I, values stored with
                      an offset of 2^(bits-1) (signed -> unsigned), weight_scale [O, groups], asymmetric
                      weight_zero_point packed along O; int-quantized (W8A8 int8) / float-quantized (FP8):
                      weight int8 / e4m3 [O, I] and weight_scale per tensor, channel or 128 x 128 block, with
                      dynamic per-token activations.
  fp8                 HF's FP8 (Qwen3 / DeepSeek releases): weight e4m3 [O, I], weight_scale_inv per
                      128 x 128 block, dynamic activations per token and group of 128.
Every format's dequantization is `scales * (q - zeros)` (fp8: `scales * q`) in float32, which
tests/test_quant_checkpoints.py checks bit for bit against each tool's own dequantization.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.quant import FP8, HostQuant

SUPPORTED = ("gptq", "awq", "auto-round", "compressed-tensors", "fp8")
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def _field(qc: dict, name: str, allowed, default=None, where: str = "quantization_config"):
    v = qc.get(name, default)
    if v not in allowed:
        raise ValueError(f"{where}.{name} = {v!r} is not supported (supported: {list(allowed)})")
    return v


def _unpack(words: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """int32 words of 32 // bits values each (lowest bits first) along `axis` -> uint8 values; `order[j]`: the
    position within each word's run of values that its j-th field holds (AWQ)."""
    per = 32 // bits
    w = np.moveaxis(words.view(np.uint32), axis, -1)
    vals = (w[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    if order is not None:
        vals = vals[..., np.argsort(order)]
    return np.moveaxis(vals.reshape(*w.shape[:-1], -1).astype(np.uint8), -1, axis)


class QuantFormat:
    """One checkpoint's `quantization_config`, checked; `read(get, prefix)` builds the HostQuant of layer
    `prefix` from its tensors (`get(name)` reads one), or returns None when that layer is not quantized."""

    def __init__(self, qc: dict):
        if not isinstance(qc, dict):
            raise ValueError("quantization_config must be an object")
        self.method = _field(qc, "quant_method", SUPPORTED + ("intel/auto-round",))
        if self.method == "intel/auto-round":
            self.method = "auto-round"
        self.qc = qc
        if self.method in ("gptq", "awq", "auto-round"):
            self.bits = _field(qc, "bits", (4, 8) if self.method != "awq" else (4,))
            g = qc.get("group_size", 128)
            if not isinstance(g, int) or (g != -1 and g <= 0):
                raise ValueError(f"quantization_config.group_size = {g!r}: expected a positive integer or -1")
            self.group = 0 if g == -1 else g
            self.layout = self.method
            if self.method == "auto-round":
                fmt = _field(qc, "packing_format", ("auto_round:auto_gptq", "auto_round:gptq", "auto_round:auto_awq",
                                                    "auto_round:awq"), "auto_round:auto_gptq")
                self.layout = "awq" if fmt.endswith("awq") else "gptq"
            self.v1 = self.layout == "gptq" and (self.method == "auto-round" or _field(
                qc, "checkpoint_format", ("gptq", "gptq_v2"), "gptq") == "gptq")
            if self.method == "awq":
                _field(qc, "version", ("gemm", "GEMM"), "gemm")
            self.scheme = f"{self.method}:{self.bits}bit-" + (f"g{self.group}" if self.group else "channel")
        elif self.method == "fp8":
            _field(qc, "activation_scheme", ("dynamic",), "dynamic")
            block = qc.get("weight_block_size")
            if block is not None and (not isinstance(block, list) or len(block) != 2):
                raise ValueError(f"quantization_config.weight_block_size = {block!r}: expected [rows, cols]")
            self.block = tuple(block) if block else None
            self.scheme = "fp8:" + (f"block{self.block[0]}x{self.block[1]}" if self.block else "channel")
        else:
            self._compressed_tensors(qc)

    def _compressed_tensors(self, qc: dict) -> None:
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise ValueError(f"quantization_config.config_groups: exactly one group is supported, got {len(groups)}")
        ((gname, group),) = groups.items()
        w, a = group.get("weights") or {}, group.get("input_activations")
        at = f"quantization_config.config_groups.{gname}"
        self.ct_format = _field(group, "format", ("pack-quantized", "int-quantized", "float-quantized",
                                                  "naive-quantized"), qc.get("format"), at)
        self.type = _field(w, "type", ("int", "float"), where=at + ".weights")
        self.bits = _field(w, "num_bits", (4, 8) if self.type == "int" else (8,), where=at + ".weights")
        self.strategy = _field(w, "strategy", ("group", "channel", "tensor", "block"), where=at + ".weights")
        self.symmetric = w.get("symmetric", True)
        if w.get("actorder") not in (None, "static", "weight"):  # "group" act-order stores g_idx: not yet read
            raise ValueError(f"{at}.weights.actorder = {w.get('actorder')!r} is not supported "
                             "(supported: null, static, weight)")
        self.group = w.get("group_size") if self.strategy == "group" else 0
        self.block = tuple(w.get("block_structure") or ()) if self.strategy == "block" else None
        self.act, self.static = None, False
        if a is not None:
            self.static = not a.get("dynamic", True)
            _field(a, "strategy", ("tensor",) if self.static else ("token", "group"), where=at + ".input_activations")
            self.act = "fp8" if a.get("type") == "float" else "int8"
        self.act_group = (a.get("group_size") or 0) if a is not None and a.get("strategy") == "group" else 0
        self.ignore = qc.get("ignore") or []
        self.scheme = (f"compressed-tensors:w{self.bits}a{8 if self.act else 16}-" + self.type +
                       (f"-g{self.group}" if self.group else f"-{self.strategy}"))

    # -------------------------------------------------------------------------------------------------
    def read(self, get, has, prefix: str) -> HostQuant | None:
        if self.method in ("gptq", "awq", "auto-round"):
            return self._gptq_awq(get, has, prefix) if has(prefix + "qweight") else None
        if self.method == "fp8":
            if not has(prefix + "weight_scale_inv"):
                return None
            return self._fp8(get(prefix + "weight"), get(prefix + "weight_scale_inv"), self.block, "fp8", 128)
        if has(prefix + "weight_packed"):
            return self._ct_packed(get, has, prefix)
        if has(prefix + "weight_scale"):
            q, s = get(prefix + "weight"), get(prefix + "weight_scale")
            if self.type == "float":
                h = self._fp8(q, s, self.block, self.act, self.act_group)
                if self.static:  # one activation scale per tensor, calibrated
                    h.act_scale = np.asarray(get(prefix + "input_scale"), np.float32).reshape(())
                return h
            s = np.broadcast_to(np.asarray(s).reshape(-1, 1) if s.ndim < 2 else s, (q.shape[0], s.shape[-1] if s.ndim == 2 else 1))
            zeros = self._zeros_from(get, has, prefix, s)
            return HostQuant(np.asarray(q).astype(np.int8), np.ascontiguousarray(s), zeros=zeros, bits=8,
                             group_size=self._group_of(q.shape[1], s.shape[1]), act=self.act, act_group=self.act_group,
                             scheme=self.scheme)
        return None

    def _group_of(self, I: int, groups: int) -> int:
        return 0 if groups == 1 else I // groups

    def _gptq_awq(self, get, has, prefix) -> HostQuant:
        bits = self.bits
        scales = np.asarray(get(prefix + "scales"))  # [groups, O]
        if self.layout == "awq":
            q = _unpack(get(prefix + "qweight"), bits, axis=1, order=AWQ_ORDER)  # [I, O]
            zeros = _unpack(get(prefix + "qzeros"), bits, axis=1, order=AWQ_ORDER).astype(np.float32)
        else:
            q = _unpack(get(prefix + "qweight"), bits, axis=0)  # [I, O]
            zeros = _unpack(get(prefix + "qzeros"), bits, axis=1).astype(np.float32)[:, : q.shape[1]]
            if self.v1:
                zeros = zeros + 1
        I = q.shape[0]
        g_idx = np.asarray(get(prefix + "g_idx")).astype(np.int32) if has(prefix + "g_idx") else None
        group = self.group or I
        if g_idx is not None and np.array_equal(g_idx, np.arange(I) // group):
            g_idx = None  # no act-order: plain groups
        if scales.shape[0] != -(-I // group) and g_idx is None:
            raise ValueError(f"{prefix}scales: {scales.shape[0]} groups for {I} inputs does not match group_size "
                             f"{self.group or -1}")
        return HostQuant(np.ascontiguousarray(q.T), np.ascontiguousarray(scales.T),
                         zeros=np.ascontiguousarray(zeros.T).astype(scales.dtype), g_idx=g_idx, bits=bits,
                         group_size=self.group if scales.shape[0] > 1 else 0, scheme=self.scheme)

    def _ct_packed(self, get, has, prefix) -> HostQuant:
        bits = self.bits
        O, I = (int(x) for x in np.asarray(get(prefix + "weight_shape")))
        q = _unpack(get(prefix + "weight_packed"), bits, axis=1)[:, :I]  # [O, I] stored as signed + 2^(bits-1)
        scales = np.asarray(get(prefix + "weight_scale"))  # [O, groups]
        zeros = self._zeros_from(get, has, prefix, scales, packed_rows=O)
        if zeros is None:
            zeros = np.full(scales.shape, 1 << (bits - 1), scales.dtype)
        return HostQuant(q, scales, zeros=zeros, bits=bits, group_size=self._group_of(I, scales.shape[1]),
                         act=self.act, act_group=self.act_group, scheme=self.scheme)

    def _zeros_from(self, get, has, prefix, scales, packed_rows: int | None = None):
        """Asymmetric zero points: q - zp with both stored alike (packed: the same offset, so the stored values
        subtract directly)."""
        if not has(prefix + "weight_zero_point"):
            return None
        zp = np.asarray(get(prefix + "weight_zero_point"))
        if packed_rows is not None and zp.dtype == np.int32 and self.bits < 8:
            zp = _unpack(zp, self.bits, axis=0)[:packed_rows]
        return zp.reshape(scales.shape).astype(scales.dtype)

    def _fp8(self, q, s, block, act, act_group) -> HostQuant:
        q = np.asarray(q)
        if q.dtype != FP8:
            raise ValueError(f"fp8 weight stored as {q.dtype}, expected float8_e4m3fn")
        O, I = q.shape
        s = np.asarray(s, np.float32)
        if block:  # [O / bo, I / bi] -> one scale per row and group of bi inputs
            bo, bi = block
            if I % bi:
                raise ValueError(f"fp8 block {bi} does not divide the {I} inputs of a layer")
            s = np.repeat(s.reshape(-(-O // bo), I // bi), bo, axis=0)[:O]
        else:  # per tensor or per channel
            s = np.broadcast_to(s.reshape(-1, 1), (O, 1)).copy()
        return HostQuant(q, s, bits=8, group_size=self._group_of(I, s.shape[1]), act=act, act_group=act_group,
                         scheme=self.scheme)


class QuantizedSafetensorsSource:
    """A SafetensorsSource whose quantized layers read as one `<m>.weight` HostQuant each (see QuantFormat)."""

    SUFFIXES = ("qweight", "weight_packed", "weight_scale_inv", "weight_scale")

    def __init__(self, base, fmt: QuantFormat):
        self.base, self.fmt = base, fmt
        self.dir = base.dir
        self._keys = set(base.keys())
        self._quantized = {}
        for k in list(self._keys):
            prefix, _, leaf = k.rpartition(".")
            if leaf in self.SUFFIXES and prefix + ".weight" not in self._quantized:
                self._quantized[prefix + ".weight"] = prefix + "."

    def keys(self):
        return self._keys | set(self._quantized)

    def get(self, key: str):
        prefix = self._quantized.get(key)
        if prefix is not None:
            h = self.fmt.read(self.base.get, self._keys.__contains__, prefix)
            if h is not None:
                return h
        return self.base.get(key)
