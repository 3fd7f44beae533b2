"""Model configurations as validated, frozen data.

``get_config(architecture, size, **overrides)`` is the one entry point. An
architecture names the mixer of every layer (``ModelConfig.layers``); a size
names a preset of shapes. The 0.4B and 1.4B presets copy the reference configs
of the paper (shared/PAPER.md section 5); ``tiny`` trains on a laptop CPU.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

MIXERS = ("gdn", "swa", "attn", "lte", "nsa")
ARCHITECTURES = ("GDN", "GDN_SWA", "GDN_Attn", "laLTE", "laNSA", "NSA", "transformer")
SIZES = ("tiny", "0.4B", "1.4B")
DTYPES = ("float32", "bfloat16")
# What a block keeps for the backward pass: everything ('none': no remat), only its input
# ('full'), its input and matmul outputs ('dots': elementwise work and the mixers' kernels
# are recomputed), or those and each mixer's core-op inputs, output and kernel residuals
# ('dots_mixers'; lte_jax.remat).
REMAT_POLICIES = ("none", "full", "dots", "dots_mixers")
# Parameter initialisation (ModelConfig.init). 'normal': every weight normal(init_std), the
# output projections (o_proj, down_proj) normal(init_std / sqrt(2 x layers)), LTE scorer conv
# biases 0. 'reference': as the reference trainer's model after its post-init, which redraws
# the output projections with PyTorch's kaiming_uniform(a=sqrt 5), U(+-1/sqrt(fan_in)), then
# divides them by sqrt(2 x layers), and leaves the scorer's conv biases at PyTorch's default
# U(+-1/sqrt(fan_in)) (lte_jax.layers.reference_init).
INIT_SCHEMES = ("normal", "reference")


def _require(cond: bool, field: str, allowed: str, value: Any) -> None:
  if not cond:
    raise ValueError(f"config field {field} must be {allowed}, got {value!r}")


def _positive(obj: Any, *names: str) -> None:
  """Sizes and windows: ints in [1, 2**31 - 1] (the ops index with int32)."""
  for name in names:
    value = getattr(obj, name)
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2 ** 31,
             f"{type(obj).__name__}.{name}", "a positive integer <= 2**31 - 1", value)


def intermediate_size(d_model: int, hidden_ratio: int = 4) -> int:
  """SwiGLU width of the reference: 2/3 of ratio x d, rounded up to a multiple of 256."""
  return 256 * math.ceil(int(d_model * hidden_ratio * 2 / 3) / 256)


@dataclasses.dataclass(frozen=True)
class GDNConfig:
  """Gated DeltaNet mixer. Value head dim = head_dim * expand_v."""
  num_heads: int = 8
  head_dim: int = 128
  expand_v: float = 1.0
  conv_size: int = 4
  use_gate: bool = True
  norm_eps: float = 1e-6
  chunk_size: int = 64
  implementation: str | None = None  # None: best available for the backend
  # 'pallas' kernel Plan fields as 'name=value;...' (lte_jax.kernels.gated_delta_rule.
  # parse_options), e.g. 'keep_states=True;block_v=32'; '' keeps the kernels' defaults.
  plan_options: str = ""
  # The q/k/v short convs (lte_jax.ops.short_conv): 'pallas' | 'xla'; None: per backend.
  conv_implementation: str | None = None

  def __post_init__(self):
    _positive(self, "num_heads", "head_dim", "conv_size", "chunk_size")
    _require(isinstance(self.plan_options, str), "GDNConfig.plan_options",
             "a string 'name=value;...'", self.plan_options)
    _require(self.expand_v > 0 and float(self.head_dim * self.expand_v).is_integer(),
             "GDNConfig.expand_v", "> 0 with head_dim * expand_v an integer", self.expand_v)
    # The layer always builds the output gate (every paper preset uses it); refuse the
    # flag rather than silently ignore it.
    _require(self.use_gate is True, "GDNConfig.use_gate", "True (the ungated output norm is "
             "not implemented)", self.use_gate)

  @property
  def head_v_dim(self) -> int:
    return int(self.head_dim * self.expand_v)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Softmax attention mixer (full or sliding window), RoPE, GQA.

  ``window_size`` follows the reference (flash-attn) convention: the number of
  visible tokens including the current one, so a query at i sees keys
  i - window_size < j <= i. None means full causal attention.
  """
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int = 64
  window_size: int | None = None
  rope_theta: float = 10000.0
  implementation: str | None = None

  def __post_init__(self):
    _positive(self, "num_heads", "num_kv_heads", "head_dim")
    _require(self.num_heads % self.num_kv_heads == 0, "AttentionConfig.num_kv_heads",
             f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
    if self.window_size is not None:
      _positive(self, "window_size")


# Operand dtypes of the LTE scorer CNN's matmuls (LTEConfig.scorer_dtype).
SCORER_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LTEConfig:
  """LTE sparse attention mixer (PAPER.md section 3).

  Query i sees key j iff j <= i and (j < sink_size or i - j <= window_size or
  the CNN retains j). ``budget`` retained slots per KV head at inference
  (sinks included); ``target_kept`` is the controller's target count of kept
  tokens per sequence of ``target_seq_len`` during training. ``scorer_dtype``: operand
  dtype of the scorer CNN's matmuls ('float32': fp32 at full precision; 'bfloat16': bf16
  operands and results, tensor-core / MXU GEMMs, as a PyTorch scorer under bf16 autocast
  runs; None: 'bfloat16' when the layer computes in bf16, else 'float32'). Bias, SiLU and
  the activations between layers stay fp32 either way. On the H200 the 0.4B laLTE step
  took 0.395 s with 'float32' and 0.343 s with 'bfloat16' (BENCHMARKS.md).
  """
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int = 64
  sink_size: int = 4
  window_size: int = 768
  budget: int = 512
  kernel_sizes: tuple[int, ...] = (3, 3, 3)
  dilations: tuple[int, ...] = (2, 2, 2)
  dropout: float = 0.1
  score_bias_init: float = 0.5
  target_kept: int = 512
  target_seq_len: int = 4096
  rope_theta: float = 10000.0
  implementation: str | None = None
  scorer_dtype: str | None = None
  # 'pallas' kernel Plan fields as 'name=value;...' (lte_jax.kernels.lte_attention.
  # parse_options), e.g. 'far_gather=copy'; '' keeps the kernels' defaults.
  plan_options: str = ""

  def __post_init__(self):
    _positive(self, "num_heads", "num_kv_heads", "head_dim", "window_size", "budget",
              "target_kept", "target_seq_len")
    _require(isinstance(self.plan_options, str), "LTEConfig.plan_options",
             "a string 'name=value;...'", self.plan_options)
    _require(self.scorer_dtype is None or self.scorer_dtype in SCORER_DTYPES,
             "LTEConfig.scorer_dtype", f"None or one of {SCORER_DTYPES}", self.scorer_dtype)
    _require(isinstance(self.sink_size, int) and self.sink_size >= 0, "LTEConfig.sink_size",
             "an integer >= 0", self.sink_size)
    _require(self.num_heads % self.num_kv_heads == 0, "LTEConfig.num_kv_heads",
             f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
    _require(self.budget > self.sink_size, "LTEConfig.budget",
             f"> sink_size={self.sink_size}", self.budget)
    _require(len(self.kernel_sizes) == len(self.dilations) and len(self.kernel_sizes) >= 1,
             "LTEConfig.dilations", f"a tuple as long as kernel_sizes={self.kernel_sizes}",
             self.dilations)
    for k in self.kernel_sizes:
      _require(isinstance(k, int) and k >= 1 and k % 2 == 1, "LTEConfig.kernel_sizes",
               "odd positive integers (centred 'same' convolutions)", self.kernel_sizes)
    _require(0.0 <= self.dropout < 1.0, "LTEConfig.dropout", "in [0, 1)", self.dropout)
    _require(self.window_size + 1 > 2 * self.lookahead, "LTEConfig.window_size",
             f"> 2 x the CNN look-ahead ({self.lookahead}) so delayed scoring fits the ring",
             self.window_size)

  @property
  def lookahead(self) -> int:
    """Future (and past) tokens the scorer CNN reads: sum of dilation*(k-1)/2."""
    return sum(d * (k - 1) // 2 for k, d in zip(self.kernel_sizes, self.dilations))


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Native Sparse Attention mixer of laNSA (PAPER.md section 4), RoPE, GQA.

  Mean-pooled compression over ``block_size``-token blocks, ``block_count`` selected
  blocks per query (blocks 0, current and previous always), and a sliding window of
  ``window_size`` visible tokens including the current one (the reference convention;
  None: no sliding branch). A sigmoid gate per branch per query head mixes the three.
  """
  num_heads: int = 32
  num_kv_heads: int = 2
  head_dim: int = 64
  block_size: int = 64
  block_count: int = 16
  window_size: int | None = 512
  rope_theta: float = 10000.0
  implementation: str | None = None

  def __post_init__(self):
    _positive(self, "num_heads", "num_kv_heads", "head_dim", "block_size", "block_count")
    _require(self.num_heads % self.num_kv_heads == 0, "NSAConfig.num_kv_heads",
             f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
    _require(self.block_count >= 3, "NSAConfig.block_count",
             ">= 3 (blocks 0, current and previous are always selected)", self.block_count)
    _require(self.head_dim % 2 == 0, "NSAConfig.head_dim", "even (RoPE)", self.head_dim)
    if self.window_size is not None:
      _positive(self, "window_size")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A hybrid decoder LM. ``layers[i]`` is the mixer of layer i, one of MIXERS."""
  vocab_size: int
  d_model: int
  layers: tuple[str, ...]
  intermediate_size: int
  gdn: GDNConfig = GDNConfig()
  attn: AttentionConfig = AttentionConfig()
  swa: AttentionConfig = AttentionConfig(window_size=1024)
  lte: LTEConfig = LTEConfig()
  nsa: NSAConfig = NSAConfig()
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  init_std: float = 0.006
  init: str = "normal"          # INIT_SCHEMES
  max_position: int = 4096
  dtype: str = "float32"        # compute dtype of activations
  param_dtype: str = "float32"  # master parameters
  remat: str = "none"           # REMAT_POLICIES; True / False mean 'full' / 'none'
  # Training forward as a lax.scan over the repeating cycle of `layers` (compile time
  # independent of depth); parameters keep one module per layer either way.
  scan_layers: bool = False

  def __post_init__(self):
    _positive(self, "vocab_size", "d_model", "intermediate_size", "max_position")
    _require(isinstance(self.layers, tuple) and len(self.layers) > 0, "ModelConfig.layers",
             "a non-empty tuple of mixer names", self.layers)
    for mixer in self.layers:
      _require(mixer in MIXERS, "ModelConfig.layers", f"mixer names from {MIXERS}", mixer)
    _require(self.dtype in DTYPES, "ModelConfig.dtype", f"one of {DTYPES}", self.dtype)
    _require(self.param_dtype in DTYPES, "ModelConfig.param_dtype", f"one of {DTYPES}",
             self.param_dtype)
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    _require(self.init in INIT_SCHEMES, "ModelConfig.init", f"one of {INIT_SCHEMES}", self.init)
    _require(self.remat in REMAT_POLICIES, "ModelConfig.remat", f"one of {REMAT_POLICIES}",
             self.remat)
    _require(isinstance(self.scan_layers, bool), "ModelConfig.scan_layers", "True or False",
             self.scan_layers)
    _require(self.swa.window_size is not None, "ModelConfig.swa.window_size",
             "a positive integer (the sliding window)", self.swa.window_size)

  @property
  def num_layers(self) -> int:
    return len(self.layers)


def _alternate(mixer: str, num_layers: int) -> tuple[str, ...]:
  """GDN on even layers, ``mixer`` on odd ones, as in the paper's hybrids."""
  return tuple("gdn" if i % 2 == 0 else mixer for i in range(num_layers))


_ARCH_LAYERS = {
    "GDN": lambda n: ("gdn",) * n,
    "GDN_SWA": lambda n: _alternate("swa", n),
    "GDN_Attn": lambda n: _alternate("attn", n),
    "laLTE": lambda n: _alternate("lte", n),
    "laNSA": lambda n: _alternate("nsa", n),
    "NSA": lambda n: ("nsa",) * n,
    "transformer": lambda n: ("attn",) * n,
}


def _preset(size: str, architecture: str) -> dict[str, Any]:
  if size == "tiny":
    d = 128
    return dict(
        vocab_size=512, d_model=d, num_layers=4, intermediate_size=intermediate_size(d),
        tie_embeddings=True, max_position=1024,
        gdn=GDNConfig(num_heads=2, head_dim=64),
        attn=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=32),
        swa=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=32, window_size=64),
        lte=LTEConfig(num_heads=4, num_kv_heads=2, head_dim=32, window_size=48, budget=24,
                      target_kept=24, target_seq_len=256),
        nsa=NSAConfig(num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, block_count=4,
                      window_size=64),
    )
  if size == "0.4B":
    d = 1024
    return dict(
        vocab_size=32000, d_model=d, num_layers=24, intermediate_size=intermediate_size(d),
        tie_embeddings=True,
        gdn=GDNConfig(num_heads=8, head_dim=128),
        attn=AttentionConfig(num_heads=16, num_kv_heads=16, head_dim=64),
        swa=AttentionConfig(num_heads=16, num_kv_heads=16, head_dim=64, window_size=1024),
        lte=LTEConfig(num_heads=16, num_kv_heads=16, head_dim=64),
        nsa=NSAConfig(num_heads=32, num_kv_heads=2, head_dim=64, block_size=64, block_count=16,
                      window_size=512),
    )
  if size == "1.4B":
    d = 2048
    return dict(
        vocab_size=32000, d_model=d, num_layers=24, intermediate_size=intermediate_size(d),
        tie_embeddings=False,
        gdn=GDNConfig(num_heads=8, head_dim=256),
        attn=AttentionConfig(num_heads=32, num_kv_heads=8, head_dim=64),
        swa=AttentionConfig(num_heads=32, num_kv_heads=8, head_dim=64, window_size=1024),
        lte=LTEConfig(num_heads=32, num_kv_heads=8, head_dim=64),
        nsa=NSAConfig(num_heads=32, num_kv_heads=2, head_dim=64, block_size=64, block_count=16,
                      window_size=512),
    )
  raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def get_config(architecture: str, size: str = "tiny", **overrides: Any) -> ModelConfig:
  """Build a validated ModelConfig.

  Args:
    architecture: one of ARCHITECTURES.
    size: one of SIZES.
    **overrides: ModelConfig fields to replace; ``num_layers`` rebuilds the layer
      pattern of the architecture with that depth.
  """
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
  if size not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")
  fields = _preset(size, architecture)
  valid = {f.name for f in dataclasses.fields(ModelConfig)} | {"num_layers"}
  for key in overrides:
    if key not in valid:
      raise ValueError(f"unknown ModelConfig field {key!r}; valid fields: {sorted(valid)}")
  fields.update(overrides)
  num_layers = fields.pop("num_layers")
  fields.setdefault("layers", _ARCH_LAYERS[architecture](num_layers))
  return ModelConfig(**fields)


def replace(config: Any, **changes: Any) -> Any:
  """dataclasses.replace with an error that lists the valid field names."""
  valid = {f.name for f in dataclasses.fields(config)}
  for key in changes:
    if key not in valid:
      raise ValueError(f"unknown {type(config).__name__} field {key!r}; valid fields: "
                       f"{sorted(valid)}")
  return dataclasses.replace(config, **changes)


def to_dict(config: Any) -> Mapping[str, Any]:
  return dataclasses.asdict(config)


_NESTED = {"gdn": GDNConfig, "attn": AttentionConfig, "swa": AttentionConfig, "lte": LTEConfig,
           "nsa": NSAConfig}
_TUPLE_FIELDS = ("layers", "kernel_sizes", "dilations")


def _from_fields(cls: type, data: Mapping[str, Any], where: str) -> Any:
  if not isinstance(data, Mapping):
    raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got "
                     f"{type(data).__name__}")
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - valid)
  if unknown:
    raise ValueError(f"unknown {where} field(s) {unknown}; valid fields: {sorted(valid)}")
  values = {}
  for key, value in data.items():
    if key in _TUPLE_FIELDS and isinstance(value, list):
      value = tuple(value)  # JSON has no tuples
    if cls is ModelConfig and key in _NESTED:
      value = _from_fields(_NESTED[key], value, f"{where}.{key}")
    values[key] = value
  return cls(**values)


def from_dict(data: Mapping[str, Any]) -> ModelConfig:
  """The inverse of ``to_dict`` (also after a JSON round trip: lists become tuples)."""
  return _from_fields(ModelConfig, data, "ModelConfig")
