"""Layout planner: parameters, memory, FLOPs, step time and communication of one training layout.

Pure arithmetic on the config (no torch import), so `tools/plan.py` answers instantly on a login
node. What it counts follows this code base, not a generic transformer:

* Parameters per rank mirror model/gpt.py, block.py, attention.py and ffn.py term by term
  (tests/unit/test_plan.py checks them against a real model built with torch, per layout).
* Weights, gradients and optimizer state follow DeepSpeed's engines as train.py configures them
  (a torch AdamW: m and v in fp32):
      precision  ZeRO  weights      grads                 master + Adam m, v (fp32)
      fp32       0     4N           4N                    8N (Adam only: the weights are fp32)
      fp32       1     4N           4N                    12N/dp (DeepSpeed keeps its own fp32 copy)
      fp32       2     4N           4N/dp + bucket        12N/dp
      bf16/fp16  0     2N           2N + 4N (fp32 accum)  12N
      bf16/fp16  1     2N           2N + 4N/dp            12N/dp
      bf16/fp16  2     2N           2N/dp + bucket + 4N/dp 12N/dp
      any        3     w N/dp + one layer gathered, grads as ZeRO-2, optimizer /dp (host with offload)
  N = parameters on the rank, dp = data-parallel size, w = bytes per weight.
* Activations are the tensors autograd saves in one micro-batch's forward, counted from the code
  (`layer_activation_bytes`; tests/unit/test_plan.py compares them with saved-tensor hooks), plus
  the LM head's logits workspace; with recompute only each layer's input is kept, plus one
  layer's full set while it is recomputed. Pipeline stage 0 holds min(P, micro-batches) of them
  in flight (1F1B).
* FLOPs per token are analysis/flops.py's (the MFU log's); step time, communication and the layout
  search are in analysis/plan_speed.py.
The predictions are checked against measured CPU peaks by benchmarks/plan_memory.py (docs/planning.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
DS_PREFETCH_BUCKET = 50_000_000  # ZeRO-3 stage3_prefetch_bucket_size default (elements)
# Dense peak TFLOP/s of one device in bf16 (spec sheets, SXM parts).
GPU_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}
ASSUMED_MFU = 0.35  # no measured GPU run of this code yet (docs/planning.md); override with --mfu
HOST_BASELINE_GIB = 3.0  # per rank: CUDA context, torch, DeepSpeed, Python (a stated assumption)


@dataclass(frozen=True)
class Layout:
    """Where and how a model is trained: devices, parallel sizes, batch, precision, memory savers."""

    nodes: int = 1
    gpus_per_node: int = 1
    tensor: int = 1
    pipeline: int = 1
    zero: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    precision: str = "bf16"
    recompute: bool = False
    core: str = "fused"  # fused | eager: the attention core that computes the entropy
    device: str = "cuda"  # cuda (the fused core is the Triton kernel) | cpu (the blocked PyTorch one)
    offload: bool = False  # ZeRO-3 parameter + optimizer offload to host memory
    gpu_memory_gib: float = 80.0
    partition: str = "parameters"  # parallel.pipeline_partition: parameters | uniform

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tensor * self.pipeline)

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def problem(self, model: "ModelShape") -> str | None:
        """Why this layout cannot run the model (None: it can)."""
        if self.world % (self.tensor * self.pipeline):
            return f"{self.world} devices are not a multiple of TP x PP = {self.tensor * self.pipeline}"
        if model.heads % self.tensor:
            return f"TP={self.tensor} does not divide {model.heads} heads"
        if self.pipeline > model.layers:
            return f"PP={self.pipeline} exceeds {model.layers} layers"
        if self.pipeline > 1 and self.zero > 1:
            return "ZeRO-2/3 cannot be combined with pipeline parallelism (DeepSpeed)"
        if self.offload and self.zero != 3:
            return "offload needs ZeRO-3 (ds_configs/zero3_offload.json)"
        if self.global_batch % (self.micro_batch * self.dp):
            return (f"global batch {self.global_batch} is not a multiple of micro-batch x DP = "
                    f"{self.micro_batch} x {self.dp}")
        return None


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model config that parameter and memory counts depend on."""

    layers: int
    hidden: int
    heads: int
    seq: int
    ffn_hidden: int
    vocab: int
    vocab_multiple: int = 128
    layernorm: bool = False
    final_norm: bool = False
    fused_ffn: bool = True
    scaled_ffn: bool = True  # alpha, beta
    weight_norm: frozenset = frozenset()  # linear names with a weight-norm gain g
    temperature: bool = True
    entropy_reg: bool = True
    qk_bias: bool = True
    tied: bool = True
    activation: str = "identity"

    @classmethod
    def from_model_config(cls, m, vocab: int | None = None) -> "ModelShape":
        spec = m.spec()
        return cls(
            layers=m.num_layers, hidden=m.hidden_size, heads=m.num_heads, seq=m.seq_length,
            ffn_hidden=m.ffn_hidden, vocab=vocab or m.vocab_size, vocab_multiple=m.make_vocab_size_divisible_by,
            layernorm=spec.norm == "layernorm", final_norm=spec.final_norm, fused_ffn=spec.ffn_kind == "fused",
            scaled_ffn=spec.ffn_stabilizer == "scale",
            weight_norm=spec.normalized_linears if spec.ffn_stabilizer == "weight_norm" else frozenset(),
            temperature=spec.learnable_temperature, entropy_reg=spec.entropy_reg, qk_bias=m.qk_bias,
            tied=m.tie_embeddings, activation=spec.activation,
        )

    def padded_vocab(self, tp: int) -> int:
        step = max(1, self.vocab_multiple) * tp
        return -(-self.vocab // step) * step


# ----------------------------------------------------------------------------- parameters

def layer_params(m: ModelShape, tp: int) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank."""
    d, h = m.hidden, m.heads // tp
    n = 4 * d * d // tp  # q, k, v (column-parallel), o (row-parallel)
    n += 2 * d // tp if m.qk_bias else 0
    n += 2 * 2 * d if m.layernorm else 0  # norm1, norm2 (replicated)
    n += d * d // tp if m.fused_ffn else 2 * d * m.ffn_hidden // tp
    n += 2 if m.scaled_ffn else 0  # alpha, beta (replicated)
    n += h * m.seq if m.temperature else 0  # t[heads_local, T]
    n += h if m.entropy_reg else 0  # theta
    # Weight-norm gains g: per output unit, sharded for column-parallel layers, replicated for row.
    gains = {"q": d // tp, "k": d // tp, "v": d // tp, "o": d}
    gains["ffn"] = d if m.fused_ffn else m.ffn_hidden // tp + d
    n += sum(gains[name] for name in m.weight_norm)
    return n


def embedding_params(m: ModelShape, tp: int) -> int:
    """Token embedding shard + learned positions (replicated)."""
    return m.padded_vocab(tp) // tp * m.hidden + m.seq * m.hidden


def head_params(m: ModelShape, tp: int) -> int:
    """Final norm, plus the output projection shard when the embeddings are untied (no bias)."""
    n = 2 * m.hidden if m.final_norm else 0
    return n + (0 if m.tied else m.padded_vocab(tp) // tp * m.hidden)


def total_params(m: ModelShape) -> int:
    """The unsharded model (TP = 1, one copy of a tied embedding)."""
    return embedding_params(m, 1) + m.layers * layer_params(m, 1) + head_params(m, 1)


def _partition_balanced(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's deepspeed.runtime.utils.partition_balanced (the linear partition problem by
    dynamic programming, minimising max - min over the parts; ties go to the later boundary),
    ported so the planner needs no torch: boundaries [0, ..., len(weights)]."""
    n, inf = len(weights), float("inf")
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    hi = [[inf] * (parts + 1) for _ in range(n + 1)]
    lo = [[inf] * (parts + 1) for _ in range(n + 1)]
    cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    pos = [[0] * (parts + 1) for _ in range(n + 1)]
    hi[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                top, bottom = max(hi[k][j - 1], prefix[i] - prefix[k]), min(lo[k][j - 1], prefix[i] - prefix[k])
                if cost[i][j] >= top - bottom:
                    cost[i][j], hi[i][j], lo[i][j], pos[i][j] = top - bottom, top, bottom, k
    bounds = [n]
    for j in reversed(range(1, parts + 1)):
        bounds.append(pos[bounds[-1]][j])
    return bounds[::-1]


def _pipeline_specs(m: ModelShape, tp: int) -> list[tuple[str, int]]:
    """training/pipeline.py's layer list as (kind, parameters): embedding, L decoder layers, the
    head, and with tied embeddings the last stage's TiedLayerSpec copy of the whole Embedding."""
    specs = [("embedding", embedding_params(m, tp))] + [("layer", layer_params(m, tp))] * m.layers
    specs.append(("head", head_params(m, tp)))
    if m.tied:
        specs.append(("embedding", embedding_params(m, tp)))
    return specs


def _stages(m: ModelShape, tp: int, pp: int, method: str) -> list[list[tuple[str, int]]]:
    specs = _pipeline_specs(m, tp)
    # "parameters" balances parameter counts; "uniform" is DeepSpeed's "type:DecoderLayer".
    weights = [n for _, n in specs] if method == "parameters" else [int(k == "layer") for k, _ in specs]
    bounds = _partition_balanced(weights, pp)
    return [specs[bounds[i]:bounds[i + 1]] for i in range(pp)]


def stage_layers(m: ModelShape, tp: int, pp: int, method: str = "parameters") -> list[int]:
    """Decoder layers per pipeline stage, partitioned as DeepSpeed's PipelineModule does."""
    if pp == 1:
        return [m.layers]
    return [sum(k == "layer" for k, _ in stage) for stage in _stages(m, tp, pp, method)]


def stage_params(m: ModelShape, tp: int, pp: int, method: str = "parameters") -> list[int]:
    """Parameters on one rank of each pipeline stage (a tied embedding is held by both ends)."""
    if pp == 1:
        return [embedding_params(m, tp) + m.layers * layer_params(m, tp) + head_params(m, tp)]
    return [sum(n for _, n in stage) for stage in _stages(m, tp, pp, method)]


# ----------------------------------------------------------------------------- activations

def attention_core_used(m: ModelShape, core: str) -> str:
    """The core a training step runs (model/attention.py select_core): SDPA when neither the
    entropy nor a temperature gradient is needed, else the configured fused or eager core."""
    return core if (m.entropy_reg or m.temperature) else "sdpa"


def layer_activation_bytes(m: ModelShape, lay: Layout) -> dict[str, int]:
    """Bytes autograd keeps for one decoder layer and one micro-batch (no recompute), by term.

    a = bytes per activation; s = b x T tokens; d_l = d / TP, h = heads / TP. Counted from the
    forward of block.py / attention.py / ffn.py, each stored tensor once however many ops keep it
    (tests/unit/test_plan.py checks the sum against saved-tensor hooks on a real model).
    """
    a, b, T, d = BYTES[lay.precision], lay.micro_batch, m.seq, m.hidden
    s, d_l, h, tp = b * T, d // lay.tensor, m.heads // lay.tensor, lay.tensor
    terms = {"layer_input": s * d * a, "attention_residual": s * d * a}  # x, and x + attention (FFN input)
    # LayerNorm keeps its output (the next linear's input) and mean / rstd in fp32, twice.
    terms["norms"] = 2 * (s * d * a + 2 * s * 4) if m.layernorm else 0
    terms["q_unscaled"] = s * d_l * a if m.temperature else 0  # q before the 1/t scale, for dt
    core = attention_core_used(m, lay.core)
    if core == "fused" and lay.device == "cuda":  # Triton: q, k, v, output in a; 3 statistics + argmax
        terms["core"] = 4 * s * d_l * a + 4 * b * h * T * 4
    elif core == "fused":  # CPU: blocked fp32 copies of q, k, v, the fp32 output, 3 statistics per row
        terms["core"] = 4 * s * d_l * 4 + 3 * b * h * T * 4
    elif core == "eager":  # five [b, h, T, T] fp32 tensors (+ the probabilities in a), q, k, v, masks
        t2 = b * h * T * T
        terms["core"] = t2 * (5 * 4 + (a if a != 4 else 0)) + s * d_l * (4 + 4 + a) + 2 * T * T
    else:  # PyTorch SDPA: q, k, v, output and the log-sum-exp
        terms["core"] = 4 * s * d_l * a + b * h * T * 4
    terms["entropy"] = b * h * T * 9 if m.entropy_reg else 0  # fp32 entropy, deviation, mask
    # The context in [b, T, d_l]: SDPA and the CPU fused core return it in that layout (a transposed
    # view), so it is the core's own saved output (in fp32 for the fused core); the Triton and eager
    # cores' [b, h, T, hd] output is copied by the transpose.
    same = core == "sdpa" or (core == "fused" and lay.device == "cpu" and a == 4)
    terms["o_input"] = 0 if same else s * d_l * a
    if m.fused_ffn:  # the row-parallel input is this rank's slice of x (a copy under TP)
        terms["ffn"] = s * d_l * a if tp > 1 else 0
    else:  # column-parallel output (+ the activation's output unless identity / ReLU reuse it)
        f_l = m.ffn_hidden // tp
        terms["ffn"] = s * f_l * a * (2 if m.activation == "gelu" else 1)
    terms["scaled_residual"] = s * d * a if m.scaled_ffn else 0  # FFN(x), for the gradient of alpha
    return terms


def head_activation_bytes(m: ModelShape, lay: Layout) -> tuple[int, int]:
    """(kept until the backward, transient peak on top) of the LM head for one micro-batch: the
    cross entropy keeps softmax [s, V/TP] in fp32 and the targets; computing it holds the logits
    (a), the masked fp32 logits, the shifted ones, their exp and the softmax at once."""
    a, s = BYTES[lay.precision], lay.micro_batch * m.seq
    v_l = m.padded_vocab(lay.tensor) // lay.tensor
    kept = s * v_l * 4 + s * m.hidden * a + s * 17  # softmax, final hidden state, int64 targets + mask
    return kept, s * v_l * (a + 3 * 4)


def activation_bytes(m: ModelShape, lay: Layout, layers: int, in_flight: int = 1) -> dict[str, int]:
    """Activation memory of a rank holding `layers` decoder layers and `in_flight` micro-batches."""
    per_layer = sum(layer_activation_bytes(m, lay).values())
    layer_input = lay.micro_batch * m.seq * m.hidden * BYTES[lay.precision]
    head_kept, head_peak = head_activation_bytes(m, lay)
    if lay.recompute:  # inputs only; one layer's full set while its backward runs
        kept = in_flight * layers * layer_input + per_layer
    else:
        kept = in_flight * layers * per_layer
    return {"layers": kept, "head": head_kept, "head_transient": head_peak}


# ----------------------------------------------------------------------------- memory

@dataclass
class Memory:
    """Bytes per rank on the device (and on the host with offload), by category."""

    params: int
    weights: int
    gradients: int
    optimizer: int
    zero_buffers: int
    activations: int
    transient: int  # peak minus the categories above, when positive (the LM head's workspace, ...)
    not_coexisting: int = 0  # bytes of the categories above that are never allocated at once
    host_offload: int = 0
    terms: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.zero_buffers + self.activations
                + self.transient - self.not_coexisting)


def model_state_bytes(n: int, lay: Layout, largest_layer: int) -> dict[str, int]:
    """Weights, gradients, optimizer state and ZeRO buffers of n parameters on one rank."""
    w = BYTES[lay.precision]
    dp, zero, mixed = lay.dp, lay.zero, lay.precision != "fp32"
    part = -(-n // dp)
    bucket = min(DS_REDUCE_BUCKET, n) * w
    master = 4 * part if mixed else (4 * part if zero >= 1 else 0)
    adam = 8 * (part if zero >= 1 else n)
    # The fp32 gradient partition ZeRO steps from is a separate tensor only when the gradients are
    # narrower; in fp32 it is the reduced gradient itself (measured: benchmarks/plan_memory.py).
    fp32_grads = 4 * part if mixed else 0
    if zero == 0:
        weights, grads, optimizer, buffers = w * n, w * n + (4 * n if mixed else 0), adam + (4 * n if mixed else 0), 0
    elif zero == 1:
        weights, grads, optimizer, buffers = w * n, w * n + fp32_grads, adam + master, 0
    elif zero == 2:
        weights, grads, optimizer, buffers = w * n, w * part + fp32_grads, adam + master, bucket
    else:
        # Gathered full parameters of the layers in flight; with one DP rank the partition is the
        # whole parameter and nothing is gathered.
        gathered = min(max(largest_layer, DS_PREFETCH_BUCKET), n) * w if dp > 1 else 0
        weights, grads, optimizer, buffers = w * part, w * part + fp32_grads, adam + master, bucket + gathered
    lp_grads = (w * n if zero <= 1 else w * part) if mixed else 0  # the 16-bit gradients
    host = 0
    if lay.offload:  # parameters and optimizer state (with its fp32 gradients) live on the host
        host = optimizer + 4 * part + w * part
        optimizer, grads, weights = 0, w * part, 0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "zero_buffers": buffers, "host": host,
            "lp_grads": lp_grads}


def memory(m: ModelShape, lay: Layout, stage: int = 0) -> Memory:
    """The planner's estimate for one rank of pipeline stage `stage`."""
    n = stage_params(m, lay.tensor, lay.pipeline, lay.partition)[stage]
    layers = stage_layers(m, lay.tensor, lay.pipeline, lay.partition)[stage]
    state = model_state_bytes(n, lay, layer_params(m, lay.tensor))
    in_flight = min(lay.pipeline - stage, lay.accumulation) if lay.pipeline > 1 else 1
    acts = activation_bytes(m, lay, layers, in_flight)
    has_head = stage == lay.pipeline - 1
    kept = acts["layers"] + (acts["head"] if has_head else 0)
    if lay.pipeline > 1:
        # DeepSpeed's pipeline engine keeps each buffered micro-batch's stage output (max(2, in
        # flight) buffers, TrainSchedule.num_pipe_buffers) and one receive buffer each for the
        # activations and the gradients, [b, T, d] apiece.
        kept += (max(2, in_flight) + 2) * lay.micro_batch * m.seq * m.hidden * BYTES[lay.precision]
    static = state["weights"] + state["gradients"] + state["optimizer"] + state["zero_buffers"]
    # DeepSpeed's bf16/fp16 optimizers set the 16-bit gradients to None after each step, so they
    # only exist from the backward on, while the activations are being freed: they meet the
    # activations of at most one layer (the fp32 gradients, as measured, stay allocated).
    lp_grads = state["lp_grads"]
    one_layer = sum(layer_activation_bytes(m, lay).values()) if layers else 0
    forward_end = static - lp_grads + kept + (acts["head_transient"] if has_head else 0)
    backward_end = static + min(kept, one_layer)
    # The optimizer step's temporaries (one fp32 copy of the local partition) come when the
    # activations are gone.
    step = static + (4 * (n if lay.zero == 0 else -(-n // lay.dp)) if not lay.offload else 0)
    peak = max(forward_end, backward_end, step)
    listed = static + kept
    return Memory(params=n, weights=state["weights"], gradients=state["gradients"], optimizer=state["optimizer"],
                  zero_buffers=state["zero_buffers"], activations=kept, transient=max(peak - listed, 0),
                  not_coexisting=max(listed - peak, 0), host_offload=state["host"],
                  terms=layer_activation_bytes(m, lay))


def peak_memory(m: ModelShape, lay: Layout) -> tuple[int, Memory]:
    """(stage, Memory) of the pipeline stage with the largest device footprint."""
    options = [(s, memory(m, lay, s)) for s in range(lay.pipeline)]
    return max(options, key=lambda item: item[1].total)


def largest_micro_batch(m: ModelShape, lay: Layout, limit: int = 1024) -> int:
    """The largest micro-batch whose peak fits the device (0: not even 1), ignoring batch divisibility."""
    capacity = lay.gpu_memory_gib * GIB * 0.95  # leave 5% for the allocator's fragmentation
    best, b = 0, 1
    while b <= limit and peak_memory(m, replace(lay, micro_batch=b, global_batch=b * lay.dp))[1].total <= capacity:
        best, b = b, b * 2
    if best:  # refine between best and 2 * best
        lo, hi = best, min(2 * best, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fits = peak_memory(m, replace(lay, micro_batch=mid, global_batch=mid * lay.dp))[1].total <= capacity
            lo, hi = (mid, hi) if fits else (lo, mid)
        best = lo
    return best


def host_bytes_per_node(m: ModelShape, lay: Layout, num_samples: int = 0) -> dict[str, int]:
    """Host memory of one node: per-rank process baseline, offloaded state, and the data order.

    The sample order is computed on the fly (data/dataset.py GlobalBatchSampler): O(1) per rank,
    whatever num_samples is; before, each rank held an int64 permutation of every sample."""
    ranks = min(lay.gpus_per_node, lay.world)
    mem = peak_memory(m, lay)[1]
    # Every rank builds its shard in fp32 on the host (parallel/random.py draws each parameter at
    # its full shape, then slices it) before it moves to the device: the largest full parameter
    # plus the fp32 shard, for a moment, on every rank at once.
    full_layer = max(m.hidden * m.hidden, m.padded_vocab(1) * m.hidden)
    build = ranks * (4 * max(stage_params(m, lay.tensor, lay.pipeline, lay.partition)) + 4 * full_layer)
    return {"process_baseline": int(ranks * HOST_BASELINE_GIB * GIB), "offload": ranks * mem.host_offload,
            "model_build": build, "data_order": 0, "data_order_before": ranks * 8 * num_samples}
