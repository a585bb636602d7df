// Every thrifty op schema, defined once. Implementations register per dispatch key in
// csrc/cpu/<family>/*_aten.cpp (CPU) and csrc/cuda/<family>/*.cpp (CUDA); Python
// wrappers, fake (meta) implementations and autograd live in python/thrifty/ops/.
// Backward passes are ops of their own so autograd and torch.compile see one node each.
#include <torch/library.h>

TORCH_LIBRARY(thrifty, m) {
  // ---- norm ----
  // y = x * rsqrt(mean(x^2, -1) + eps) * weight; also returns rstd (leading dims of x, float32) for the backward.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  // h = x + residual; y = rms_norm(h): the fused add + norm of a pre-norm block. Returns (y, h, rstd).
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor y, Tensor h, Tensor rstd)");
  // Gradients of rms_norm w.r.t. its input x (h for the fused op; plus grad_h if given) and weight.
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, Tensor? grad_h) -> (Tensor grad_x, Tensor grad_weight)");

  // ---- rotary ----
  // Rotates the first rotary_dim features of q (..., heads, head_dim) and k (..., kv_heads, head_dim) by the angles
  // of cos_sin_cache[positions] (max_position, rotary_dim) float32 [cos | sin]; neox half-split or GPT-J interleaved.
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, bool interleaved) -> (Tensor q_rot, Tensor k_rot)");
  // Gradient of rotary_embedding: the inverse rotation applied to grad_q_rot and grad_k_rot.
  m.def("rotary_embedding_backward(Tensor grad_q, Tensor grad_k, Tensor positions, Tensor cos_sin_cache, bool interleaved) -> (Tensor grad_q, Tensor grad_k)");

  // ---- attention ----
  // Exact attention, never materialising seqlen_q x seqlen_k. Batched when cu_seqlens_q/k are None:
  // q (b, sq, h, d), k/v (b, sk, hk, d), lse (b, h, sq); varlen otherwise: q (total_q, h, d),
  // k/v (total_k, hk, d), cu_seqlens int32 (b+1), lse (h, total_q). See common/attention_params.h for masking.
  // max_seqlen_q/k: varlen only (the batched call reads the lengths from q and k, and ignores them).
  m.def("flash_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap) -> (Tensor out, Tensor lse)");
  // Gradients of flash_attention_fwd, recomputing the probabilities from lse.
  m.def("flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");

  // ---- activation ----
  // silu(gate) * up, elementwise; gate and up have one shape.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  // (grad * up * silu'(gate), grad * silu(gate)), recomputing silu(gate) instead of storing it.
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");

  // ---- optim ----
  // Global L2 norm of a list of tensors (float32 0-d; float32 sums per chunk, a fixed-order sum: deterministic on CPU).
  // NaN/inf when any element is: the optimizers use it as their fused inf/nan check.
  m.def("multi_tensor_l2norm(Tensor[] tensors) -> Tensor");
  // One fused AdamW step over many tensors (one pass / one launch): per tensor, g *= grad_coef; p *= 1 - lr wd;
  // m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps),
  // t = steps[i] + 1, then steps[i] = t. masters (float32, or an empty list) are updated and rounded into params.
  // Nothing changes (steps included) when found_inf is nonzero. lr, grad_coef, found_inf: one-value float32 tensors.
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, Tensor(e!)[] steps, Tensor lr, float beta1, float beta2, float eps, float weight_decay, Tensor? grad_coef, Tensor? found_inf) -> ()");
  // adamw_step with 8-bit moments: uint8 codes into the 256-value maps qmap_m (signed) / qmap_v (unsigned), scaled
  // per 256-element block by absmax_m / absmax_v; dequantize, update, new absmax, requantize to the nearest code.
  m.def("adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] absmax_m, Tensor(e!)[] absmax_v, Tensor qmap_m, Tensor qmap_v, Tensor(f!)[] masters, Tensor(g!)[] steps, Tensor lr, float beta1, float beta2, float eps, float weight_decay, Tensor? grad_coef, Tensor? found_inf) -> ()");
  // One fused Lion step: c = lerp(m, g, 1 - b1); p = p (1 - lr wd) - lr sign(c); m = lerp(m, g, 1 - b2).
  m.def("lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] masters, Tensor lr, float beta1, float beta2, float weight_decay, Tensor? grad_coef, Tensor? found_inf) -> ()");
  // ---- linear ----
  // y = x @ weight.T (+ bias): x (..., K), weight (N, K), bias (N,), one dtype (float32/bfloat16/float16), float32
  // accumulation, y (..., N) in that dtype. CPU: a bandwidth-bound GEMV for few rows (decode), ATen's GEMM above.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // ---- quant ----
  // y = x @ dequant(qweight).T (+ bias), x (..., K) float32/bfloat16/float16. bits 8: qweight int8 (N, K), scales (N,),
  // w = q * s; bits 4: qweight uint8 (N, K/2) (k even in the low nibble), scales/zeros float32 (N, K/group_size),
  // w = (q - z) * s. Formats: docs/QUANT_FORMATS.md.
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, Tensor? bias) -> Tensor");
  // dequant(qweight) as float32 (N, K): exactly the weights quant_linear multiplies by.
  m.def("quant_dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size) -> Tensor");
  // Dynamic symmetric per-row int8: scales = amax(|x|, -1) / 127 (float32, (..., 1)), xq = round(x / scales) in [-127, 127].
  m.def("quantize_per_token(Tensor x) -> (Tensor xq, Tensor scales)");
  // W8A8: y = (xq @ wq.T in int32) * x_scales * w_scales (+ bias), xq int8 (..., K), wq int8 (N, K); out_dtype default Float.
  m.def("int8_linear(Tensor xq, Tensor x_scales, Tensor wq, Tensor w_scales, Tensor? bias, ScalarType? out_dtype) -> Tensor");
  // ---- loss ----
  // Cross-entropy of hidden (tokens, H) @ weight (V, H)^T against labels (tokens,) int64, chunked over tokens so the
  // (tokens, V) logits never exist. reduction 0 none / 1 mean / 2 sum; softcap > 0 caps logits c*tanh(x/c).
  // Returns the loss (float32: ops/loss.py rounds it to hidden's dtype outside autocast; scalar, or (tokens,) for none) and lse (tokens,) float32 for the backward.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, int reduction, float label_smoothing, float softcap, int chunk_size) -> (Tensor loss, Tensor lse)");
  // The same as one chunk, also returning its logits (tokens, V) in hidden's dtype for the backward (small inputs).
  m.def("linear_cross_entropy_keep_logits(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, int reduction, float label_smoothing, float softcap) -> (Tensor loss, Tensor lse, Tensor logits)");
  // Gradients w.r.t. hidden and weight, recomputing the logits block by block over the vocab from lse, or
  // taking them from `logits` (the keep_logits forward's third output; read, not modified).
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor labels, Tensor lse, int ignore_index, int reduction, float label_smoothing, float softcap, int chunk_size, Tensor? logits=None) -> (Tensor grad_hidden, Tensor grad_weight)");
}
