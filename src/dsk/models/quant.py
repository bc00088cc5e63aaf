"""Weight quantization of a dsk Transformer: int8 (weight-only, dynamic, static) and int4 group-wise.

The float ``nn.Linear`` layers inside the blocks (attention projections, SwiGLU layers, shared
experts) and the routed experts are replaced by :class:`QuantLinear` modules that hold the
packed integer weights and their scales as buffers, so ``state_dict()`` is exactly what goes
into ``model.safetensors``. Embeddings, norms and the router stay in floating point.

Schemes (``bits``/``scheme``):

* 8 / ``weight-only``: int8 weights, one symmetric scale per output channel; runs on torch's
  ``_weight_int8pack_mm`` CPU kernel (int8 weights are widened inside the kernel).
* 8 / ``dynamic``: the same weights, activations quantized to int8 per token at run time
  (symmetric), ``torch._int_mm`` int8 x int8 -> int32, rescaled.
* 8 / ``static``: the same weights, activations quantized with a per-tensor asymmetric uint8
  scale/zero point calibrated on validation data (:func:`calibrate`).
* 4 / ``weight-only``: uint4 weights with a scale and a zero point per group of ``group_size``
  input channels, two values per byte; runs on ``_weight_int4pack_mm_for_cpu``.

    >>> from dsk.models.quant import quantize_model
    >>> qmodel = quantize_model(model, bits=4, group_size=64)
    >>> save_model(qmodel, "out/")       # load_model("out/") gives the quantized model back

Each weight-only scheme falls back to "dequantize, then matmul" when its kernel is missing
(e.g. on another torch build), so a quantized artifact always loads.

The weight-only kernels run with bf16 activations: on this CPU (AVX512-BF16) torch's
``_weight_int8pack_mm``/``_weight_int4pack_mm_for_cpu`` take 6-13 us for a 1x256 @ 256x1024 step
in bf16 but 230-1800 us in fp32 or fp16 (scalar reference loops), i.e. 50-100x slower than the
fp32 dense matmul they replace. bf16 activations add ~0.3% relative error per layer; the
perplexity every run records includes it, because it is what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.errors import DskError

BITS = (16, 8, 4)
SCHEMES = ("weight-only", "dynamic", "static")
GROUP_SIZES = (16, 32, 64, 128)
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_FORMAT_VERSION = 1
KERNEL_DTYPE = torch.bfloat16  # activation dtype of the weight-only int kernels (see module doc)


@dataclass
class QuantConfig:
    bits: int = 8
    scheme: str = "weight-only"
    group_size: int | None = None  # int4 only
    float_dtype: str = "float16"  # storage dtype of the tensors that stay in floating point
    quantize_head: bool = False  # also quantize the LM head (a separate copy when tied)
    format_version: int = QUANT_FORMAT_VERSION

    def validate(self) -> None:
        if self.bits not in BITS:
            raise DskError(f"unsupported bits={self.bits}; choose one of {', '.join(map(str, BITS))}")
        if self.scheme not in SCHEMES:
            raise DskError(f"unsupported scheme={self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.bits == 4:
            if self.scheme != "weight-only":
                raise DskError(f"--bits 4 supports only --scheme weight-only, not {self.scheme!r}")
            if self.group_size not in GROUP_SIZES:
                raise DskError(
                    f"unsupported group size {self.group_size}; choose one of {', '.join(map(str, GROUP_SIZES))}"
                )
        if self.bits == 16 and self.scheme != "weight-only":
            raise DskError(f"--bits 16 supports only --scheme weight-only, not {self.scheme!r}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise DskError(f"unsupported float dtype {self.float_dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {"bits", "scheme", "group_size", "float_dtype", "quantize_head", "format_version"}
        qc = cls(**{k: v for k, v in data.items() if k in known})
        if qc.format_version > QUANT_FORMAT_VERSION:
            raise DskError(f"quantized model format v{qc.format_version} is newer than this dsk; upgrade dsk")
        qc.validate()
        return qc


# --------------------------------------------------------------------------- int4 packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint4 values [..., K] (0..15, K even) -> bytes [..., K/2]; the even index is the low nibble."""
    if q.shape[-1] % 2:
        raise DskError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] -> uint4 values [..., K] as uint8 (inverse of :func:`pack_int4`)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


# --------------------------------------------------------------------------- weight quantizers


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], fp32 scale [N]) with w ~= q * scale (symmetric, per output row)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groupwise(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], fp16 scales [N, K/g], uint8 zero points [N, K/g]).

    Asymmetric per group: w ~= (q - zero) * scale with q in 0..15; the group's min and max map to
    0 and 15 (the zero point is rounded, so 0.0 is exactly representable).
    """
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    # fp16 scales are what is stored; quantize against the rounded value so nothing drifts
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).half().float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    return pack_int4(q), scale.half(), zero.to(torch.uint8)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    N, K = q.shape
    q = q.view(N, K // group_size, group_size)
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(N, K)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# --------------------------------------------------------------------------- the module


class QuantLinear(nn.Module):
    """``y = x W^T`` with W stored as int8 or packed int4 (see the module docstring for schemes)."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, scheme: str = "weight-only",
                 group_size: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.scheme = bits, scheme
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features))
            if scheme == "static":
                self.register_buffer("act_scale", torch.ones(()))
                self.register_buffer("act_zero", torch.zeros((), dtype=torch.uint8))
        elif bits == 4:
            if not group_size:
                raise DskError("int4 QuantLinear needs a group size")
            group_size = min(group_size, in_features)
            if in_features % group_size:
                raise DskError(
                    f"group size {group_size} does not divide the layer width {in_features}; "
                    f"choose a group size from {', '.join(map(str, GROUP_SIZES))} that divides it"
                )
            self.group_size = group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, in_features // group_size, dtype=torch.uint8))
        else:
            raise DskError(f"QuantLinear supports bits 8 or 4, not {bits}")
        self.calibrating = False
        self._kernel_state: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, bits: int, scheme: str = "weight-only",
                   group_size: int | None = None) -> "QuantLinear":
        out_features, in_features = weight.shape
        m = cls(in_features, out_features, bits=bits, scheme=scheme, group_size=group_size)
        with torch.no_grad():
            if bits == 8:
                q, s = quantize_int8_per_channel(weight)
                m.qweight.copy_(q)
                m.scale.copy_(s)
            else:
                packed, scales, zeros = quantize_int4_groupwise(weight, m.group_size)
                m.qweight.copy_(packed)
                m.scales.copy_(scales)
                m.zeros.copy_(zeros)
        return m

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, scheme={self.scheme}{g}"

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel_state = None  # new weights: rebuild the kernel forms on the next call
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scale[:, None]
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)

    def _kernel(self) -> dict[str, torch.Tensor]:
        """Derived, non-persistent forms of the weights for the int kernels (built once, lazily)."""
        if self._kernel_state is None or self._kernel_state["src"] is not self.qweight:
            state: dict[str, torch.Tensor] = {"src": self.qweight}
            # the CPU int4 kernel tiles output rows by 16 and takes groups of 32..256; other layers
            # dequantize once and keep it
            if (self.bits == 4 and _has_op("_convert_weight_to_int4pack_for_cpu")
                    and self.qweight.device.type == "cpu" and self.out_features % 16 == 0
                    and self.group_size in KERNEL_GROUP_SIZES):
                q = unpack_int4(self.qweight).to(torch.int32)
                state["int4pack"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                scales = self.scales.float()
                # the kernel dequantizes as (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale
                zero_f = (8.0 - self.zeros.float()) * scales
                state["scales_and_zeros"] = (
                    torch.stack([scales, zero_f], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
                )
            elif self.bits == 4:
                state["dequantized"] = self.dequantized_weight()
            if self.bits == 8:
                state["scale_kernel"] = self.scale.to(KERNEL_DTYPE)
            if self.bits == 8 and self.scheme in ("dynamic", "static"):
                state["qweight_t"] = self.qweight.t()
                state["row_sum"] = self.qweight.to(torch.int32).sum(dim=1)
            self._kernel_state = state
        return self._kernel_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or x2.device.type != "cpu":
            y = F.linear(x2, self.dequantized_weight().to(x2.dtype))
        elif self.bits == 4:
            k = self._kernel()
            if "int4pack" in k:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x2.to(KERNEL_DTYPE).contiguous(), k["int4pack"], self.group_size, k["scales_and_zeros"]
                ).float()
            else:
                y = F.linear(x2, k["dequantized"])
        elif self.scheme == "dynamic" and not self.calibrating:
            y = self._dynamic_int8(x2)
        elif self.scheme == "static" and not self.calibrating:
            y = self._static_int8(x2)
        elif _has_op("_weight_int8pack_mm"):
            k = self._kernel()
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE).contiguous(), self.qweight, k["scale_kernel"]).float()
        else:
            y = F.linear(x2, self.dequantized_weight())
        return y.view(*shape[:-1], self.out_features)

    def _dynamic_int8(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token symmetric int8 activations; int8 x int8 -> int32 on torch._int_mm."""
        k = self._kernel()
        x_scale = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, k["qweight_t"])
        return acc.float() * x_scale * self.scale[None, :]

    def _static_int8(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tensor asymmetric uint8 activations with calibrated scale/zero point.

        The uint8 code u = round(x/s) + z is shifted by 128 into int8 so torch._int_mm can run
        it; the zero point's contribution is removed with the precomputed weight row sums:
        x ~= s (u - z) = s ((u-128) - (z-128)), so x W^T ~= s (u8 W^T - (z-128) rowsum(W)).
        """
        k = self._kernel()
        s, z = self.act_scale, self.act_zero.to(torch.int32)
        u = torch.round(x / s).add_(z).clamp_(0, 255)
        acc = torch._int_mm((u - 128).to(torch.int8), k["qweight_t"])
        acc = acc - (z - 128) * k["row_sum"][None, :]
        return acc.float() * (s * self.scale)[None, :]

    # ---- calibration of static activation ranges
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        self._range = (min(lo, getattr(self, "_range", (lo, hi))[0]), max(hi, getattr(self, "_range", (lo, hi))[1]))

    def finish_calibration(self) -> None:
        lo, hi = getattr(self, "_range", (-1.0, 1.0))
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range must contain 0 so that 0 is exact
        scale = max((hi - lo) / 255.0, 1e-8)
        zero = int(round(-lo / scale))
        with torch.no_grad():
            self.act_scale.fill_(scale)
            self.act_zero.fill_(min(max(zero, 0), 255))
        self.calibrating = False


class QuantExperts(nn.Module):
    """The routed experts with quantized weights: ``expert(e, x)`` like :class:`dsk.models.model.Experts`."""

    def __init__(self, n: int, dim: int, inter_dim: int, **qkw: Any):
        super().__init__()
        self.w1 = nn.ModuleList(QuantLinear(dim, inter_dim, **qkw) for _ in range(n))
        self.w2 = nn.ModuleList(QuantLinear(inter_dim, dim, **qkw) for _ in range(n))
        self.w3 = nn.ModuleList(QuantLinear(dim, inter_dim, **qkw) for _ in range(n))

    @classmethod
    def from_float(cls, experts: nn.Module, **qkw: Any) -> "QuantExperts":
        n, inter_dim, dim = experts.w1.shape
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.w1 = nn.ModuleList(QuantLinear.from_float(experts.w1[e], **qkw) for e in range(n))
        m.w2 = nn.ModuleList(QuantLinear.from_float(experts.w2[e], **qkw) for e in range(n))
        m.w3 = nn.ModuleList(QuantLinear.from_float(experts.w3[e], **qkw) for e in range(n))
        return m

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.w2[e](F.silu(self.w1[e](x)) * self.w3[e](x))


# --------------------------------------------------------------------------- model surgery


def _block_linears(model: nn.Module) -> Iterable[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the blocks except the router."""
    for block in model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child


def _replace(model: nn.Module, qc: QuantConfig, *, from_float: bool) -> None:
    from dsk.models.model import Experts

    qkw = dict(bits=qc.bits, scheme=qc.scheme, group_size=qc.group_size)
    for parent, name, lin in list(_block_linears(model)):
        q = (QuantLinear.from_float(lin.weight.detach(), **qkw) if from_float
             else QuantLinear(lin.in_features, lin.out_features, **qkw))
        setattr(parent, name, q)
    for block in model.layers:
        experts = getattr(block.ffn, "experts", None)
        if isinstance(experts, Experts):
            n, inter_dim, dim = experts.w1.shape
            block.ffn.experts = (QuantExperts.from_float(experts, **qkw) if from_float
                                 else QuantExperts(n, dim, inter_dim, **qkw))
    if qc.quantize_head:
        head = model.head
        model.head = (QuantLinear.from_float(head.weight.detach(), **qkw) if from_float
                      else QuantLinear(head.in_features, head.out_features, **qkw))


def check_group_size(model: nn.Module, qc: QuantConfig) -> None:
    """Fail before any work when the group size does not divide a layer's input width."""
    if qc.bits != 4:
        return
    widths = {lin.in_features for _, _, lin in _block_linears(model)}
    for block in model.layers:
        experts = getattr(block.ffn, "experts", None)
        if experts is not None and hasattr(experts, "w1") and isinstance(experts.w1, torch.Tensor):
            widths |= {experts.w1.shape[2], experts.w2.shape[2]}
    if qc.quantize_head:
        widths.add(model.head.in_features)
    bad = sorted(w for w in widths if w >= qc.group_size and w % qc.group_size)
    if bad:
        ok = [g for g in GROUP_SIZES if all(w % g == 0 or w < g for w in widths)]
        raise DskError(
            f"group size {qc.group_size} does not divide the layer width {bad[0]}; "
            f"group sizes that fit this model: {', '.join(map(str, ok)) or 'none'}"
        )


def quantize_model(model: nn.Module, *, bits: int, scheme: str = "weight-only", group_size: int | None = None,
                   float_dtype: str = "float16", quantize_head: bool = False) -> nn.Module:
    """A quantized copy of ``model`` (the input is left untouched); see the module docstring."""
    import copy

    qc = QuantConfig(bits=bits, scheme=scheme, group_size=group_size if bits == 4 else None,
                     float_dtype=float_dtype, quantize_head=quantize_head)
    qc.validate()
    check_group_size(model, qc)
    qmodel = copy.deepcopy(model).float().eval()
    if bits != 16:
        _replace(qmodel, qc, from_float=True)
    qmodel.quant_config = qc
    _round_float_params(qmodel, qc)
    return qmodel


def _round_float_params(model: nn.Module, qc: QuantConfig) -> None:
    """Make the in-memory float tensors equal what the storage dtype will keep (so the
    evaluated model is exactly the saved one); the router and norms stay fp32."""
    dtype = FLOAT_DTYPES[qc.float_dtype]
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for name, p in storage_float_tensors(model):
            p.copy_(p.to(dtype).float())


def storage_float_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating-point tensors stored in ``float_dtype``: all but norms, router and int-kernel scales."""
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or _keep_fp32(name):
            continue
        out.append((name, t))
    return out


def _keep_fp32(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        "norm" in name  # RMSNorm weights (attn_norm, ffn_norm, kv_norm, q_norm, norm)
        or ".gate." in name or name.endswith(".gate.weight")  # the router and its balancing bias
        or leaf in ("scale", "scales", "act_scale")  # quantization parameters keep their own dtype
    )


def state_dict_for_storage(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast the float tensors that :func:`storage_float_tensors` names to the storage dtype."""
    qc: QuantConfig | None = getattr(model, "quant_config", None)
    if qc is None:
        return state
    dtype = FLOAT_DTYPES[qc.float_dtype]
    return {k: (v.to(dtype) if v.is_floating_point() and not _keep_fp32(k) else v) for k, v in state.items()}


def prepare_for_loading(model: nn.Module, qc: QuantConfig) -> None:
    """Give a freshly built float model the quantized structure described by ``qc``."""
    qc.validate()
    if qc.bits != 16:
        _replace(model, qc, from_float=False)
    model.quant_config = qc


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Record activation ranges of every static QuantLinear over ``batches``; returns tokens seen."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.scheme == "static"]
    for m in layers:
        m.calibrating = True
    seen = 0
    with torch.no_grad():
        for x in batches:
            model(x)
            seen += x.numel()
    for m in layers:
        m.finish_calibration()
    return seen


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant_config", None) is not None
