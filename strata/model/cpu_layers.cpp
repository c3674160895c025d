// The decoder layers of a decode-only batch in one call (CPU, bfloat16 activations, int4 or
// bfloat16 weights): the same ops in the same order as strata/model/layers.py runs them
// (strata's C kernels for the linear layers where they apply, else oneDNN's linear on the
// weights Linear prepacked, called through the dispatcher, or ATen's int4 product; strata's
// C kernels for the norms, rope, KV write + paged decode and silu-and-mul), minus the Python between them, which is ~25% of a
// batch-1 step.
// Built and loaded by strata/model/cpu_layers.py; exported with C linkage for ctypes.
// the operators it calls, not <ATen/ATen.h> (every operator's header: 12.2 against 9.4 s of
// a cold build on a 2-core EPYC)
#include <ATen/core/Tensor.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

using add_rms_norm_fn = int (*)(const uint16_t *, uint16_t *, const uint16_t *, uint16_t *,
                                int64_t, int, float);
using rope_fn = int (*)(uint16_t *, int64_t, int, int, int64_t, const uint16_t *,
                        const uint16_t *);
using write_decode_fn = int (*)(int, const void *, const void *, void *, void *,
                                const int64_t *, const int64_t *, int64_t, const void *, void *,
                                const int64_t *, const int64_t *, int, int, int, int, int, int,
                                int64_t, float, int, int, int64_t, int64_t);
using silu_mul_fn = int (*)(const uint16_t *, uint16_t *, int64_t, int64_t);
using linear_fn = int (*)(const uint16_t *, const void *, const uint16_t *, uint16_t *, int64_t,
                        int64_t, int64_t);
using int4_fn = int (*)(const uint16_t *, const void *, const uint16_t *, uint16_t *, int64_t,
                        int64_t, int64_t, int64_t);
using pairs_fn = int (*)(int, const void *, const void *, int, const void *, void *, int64_t,
                         int64_t, int64_t);  // cpu_gemm.c's linear_avx2

// mkldnn::_linear_pointwise(x, packed weight, bias, "none", [None], ""), as Linear calls it
at::Tensor onednn_linear(const at::Tensor &x, const at::Tensor &w, const at::Tensor &bias) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack;
    stack.reserve(6);
    stack.emplace_back(x);
    stack.emplace_back(w);
    stack.emplace_back(bias.defined() ? c10::IValue(bias) : c10::IValue());
    stack.emplace_back(std::string("none"));
    stack.emplace_back(c10::List<std::optional<at::Scalar>>({std::nullopt}));
    stack.emplace_back(std::string(""));
    op.callBoxed(&stack);
    return stack[0].toTensor();
}

// How a layer's weight is kept (CpuLayers passes it): oneDNN's packed bfloat16, ATen's int4
// packing, strata's (linear.pack_int4, for cpu_ops.c's int4 kernels), or bfloat16 pairs
// (linear.pack_pairs, for cpu_gemm.c's AVX2 kernel).
enum Kind : int64_t { ONEDNN = 0, ATEN_INT4 = 1, STRATA_INT4 = 2, PAIRS = 3 };

struct Linear {
    Kind kind = ONEDNN;
    at::Tensor packed, scales, bias;  // bias undefined when there is none
    int64_t group = 0, out = 0, in = 0;
    void *raw = nullptr;         // oneDNN: the packed weight's address where kernel reads it;
                                 // strata int4: the packed weight
    linear_fn kernel = nullptr;  // oneDNN: strata's C kernels, for up to kernel_rows rows
    int64_t kernel_rows = 0;
    int4_fn int4 = nullptr;      // strata int4: its kernel
    pairs_fn pairs = nullptr;    // pairs: its kernel (raw: the packed weight)

    at::Tensor operator()(const at::Tensor &x) const {
        const uint16_t *b = bias.defined() ? static_cast<const uint16_t *>(bias.data_ptr()) : nullptr;
        const auto *xp = static_cast<const uint16_t *>(x.data_ptr());
        if (kind == PAIRS) {
            at::Tensor y = at::empty({x.size(0), out}, x.options());
            if (pairs(1, xp, raw, 0, b, y.data_ptr(), x.size(0), out, in))
                throw std::runtime_error("linear_avx2 failed");
            return y;
        }
        if (kind == STRATA_INT4) {
            at::Tensor y = at::empty({x.size(0), out}, x.options());
            if (int4(xp, raw, b, static_cast<uint16_t *>(y.data_ptr()), x.size(0), out, in, group))
                throw std::runtime_error("int4_linear_bf16 failed");
            return y;
        }
        if (kind == ONEDNN && raw && x.size(0) <= kernel_rows) {  // as Linear.__call__
            at::Tensor y = at::empty({x.size(0), out}, x.options());
            if (kernel(xp, raw, b, static_cast<uint16_t *>(y.data_ptr()), x.size(0), out, in) == 0)
                return y;
        }
        if (kind == ONEDNN) return onednn_linear(x, packed, bias);
        at::Tensor y = at::_weight_int4pack_mm_for_cpu(x, packed, group, scales);
        return bias.defined() ? y.add_(bias) : y;
    }
};

// The tensor whose TensorImpl is at `impl` (a Python tensor's _cdata), sharing it: oneDNN's
// packed weights are opaque tensors with no data pointer to wrap.
at::Tensor share(int64_t impl) {
    return at::Tensor(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(
        reinterpret_cast<c10::TensorImpl *>(impl)));
}

struct Layer {
    Linear qkv, o_proj, gate_up, down;
    at::Tensor norm1, norm2;
};

struct Model {
    int heads = 0, kv_heads = 0, head_dim = 0, hidden = 0;
    float eps = 0, scale = 0;
    add_rms_norm_fn add_rms_norm = nullptr;
    rope_fn rope = nullptr;
    write_decode_fn write_decode = nullptr;
    silu_mul_fn silu_mul = nullptr;
    linear_fn linear = nullptr;
    int64_t linear_rows = 0;
    int4_fn int4 = nullptr;
    pairs_fn pairs = nullptr;
    std::vector<Layer> layers;
};

at::Tensor wrap(void *data, std::vector<int64_t> shape, at::ScalarType type) {
    return at::from_blob(data, shape, at::TensorOptions().dtype(type));
}

uint16_t *u16(const at::Tensor &t) { return static_cast<uint16_t *>(t.data_ptr()); }

}  // namespace

extern "C" {

void *model_new(int heads, int kv_heads, int head_dim, int hidden, float eps, float scale,
                void *add_rms_norm, void *rope, void *write_decode, void *silu_mul,
                void *linear_packed, int linear_rows, void *int4_linear, void *linear_avx2) {
    auto *m = new Model();
    m->heads = heads, m->kv_heads = kv_heads, m->head_dim = head_dim, m->hidden = hidden;
    m->eps = eps, m->scale = scale;
    m->add_rms_norm = reinterpret_cast<add_rms_norm_fn>(add_rms_norm);
    m->rope = reinterpret_cast<rope_fn>(rope);
    m->write_decode = reinterpret_cast<write_decode_fn>(write_decode);
    m->silu_mul = reinterpret_cast<silu_mul_fn>(silu_mul);
    m->linear = reinterpret_cast<linear_fn>(linear_packed), m->linear_rows = linear_rows;
    m->int4 = reinterpret_cast<int4_fn>(int4_linear);
    m->pairs = reinterpret_cast<pairs_fn>(linear_avx2);
    return m;
}

void model_free(void *model) { delete static_cast<Model *>(model); }

// Adds a layer. linears: for qkv, o_proj, gate_up, down in turn: kind (Kind), weight, out and
// in features, group size, aux, bias address (0 for none); the weights are the caller's (it
// keeps them alive). PAIRS: weight is the pairs' address. ONEDNN: weight is the packed
// weight's TensorImpl (shared, not copied),
// aux the address strata's kernels read (Linear.address; 0 for none). ATEN_INT4 and
// STRATA_INT4: weight is the packed codes' address as Int4Linear keeps them; aux the
// scales' address (ATen's; strata's packing holds its own).
int model_add_layer(void *model, const int64_t *linears, void *norm1, void *norm2) {
    auto *m = static_cast<Model *>(model);
    try {
        Layer layer;
        Linear *parts[] = {&layer.qkv, &layer.o_proj, &layer.gate_up, &layer.down};
        for (int i = 0; i < 4; i++) {
            const int64_t *l = linears + 7 * i;
            Linear &p = *parts[i];
            p.kind = static_cast<Kind>(l[0]);
            p.out = l[2], p.in = l[3], p.group = l[4];
            if (p.kind == ONEDNN) {
                p.packed = share(l[1]);
                p.raw = reinterpret_cast<void *>(l[5]);
                p.kernel = m->linear, p.kernel_rows = m->linear_rows;
            } else if (p.kind == STRATA_INT4) {
                p.raw = reinterpret_cast<void *>(l[1]);
                p.int4 = m->int4;
            } else if (p.kind == PAIRS) {
                p.raw = reinterpret_cast<void *>(l[1]);
                p.pairs = m->pairs;
            } else {
                p.packed = wrap(reinterpret_cast<void *>(l[1]), {p.out, p.in / 2}, at::kByte);
                p.scales = wrap(reinterpret_cast<void *>(l[5]), {p.in / p.group, p.out, 2},
                                at::kBFloat16);
            }
            if (l[6]) p.bias = wrap(reinterpret_cast<void *>(l[6]), {p.out}, at::kBFloat16);
        }
        layer.norm1 = wrap(norm1, {m->hidden}, at::kBFloat16);
        layer.norm2 = wrap(norm2, {m->hidden}, at::kBFloat16);
        m->layers.push_back(layer);
        return 0;
    } catch (...) {
        return -1;
    }
}

// Runs every layer on x [rows, hidden] (the embeddings: the residual stream, updated in
// place) and writes the last layer's MLP output to out [rows, hidden]. cos, sin [rows,
// head_dim]; pages, offsets [rows]; table [rows, width], lens [rows]: as
// cpu_kernels.DecodePlan holds them (shared: the pages every row's table starts with).
// kv [layers, 2]: each layer's K and V of page 0 in the
// pool, pages page_stride elements apart.
int model_decode(void *model, void *x_data, void *out_data, int64_t rows,
                 const void *cos, const void *sin, const int64_t *pages, const int64_t *offsets,
                 const int64_t *table, const int64_t *lens, int width, int splits,
                 int shared, const int64_t *kv, int page_size, int64_t page_stride) {
    auto *m = static_cast<Model *>(model);
    try {
        const int d = m->head_dim, q_size = m->heads * d, kv_size = m->kv_heads * d;
        at::Tensor x = wrap(x_data, {rows, m->hidden}, at::kBFloat16);
        at::Tensor delta;  // the previous layer's MLP output, added by the next norm
        at::Tensor h = at::empty_like(x);
        for (size_t i = 0; i < m->layers.size(); i++) {
            const Layer &layer = m->layers[i];
            void *kp = reinterpret_cast<void *>(kv[2 * i]), *vp = reinterpret_cast<void *>(kv[2 * i + 1]);
            m->add_rms_norm(delta.defined() ? u16(delta) : nullptr, u16(x), u16(layer.norm1),
                            u16(h), rows, m->hidden, m->eps);
            at::Tensor qkv = layer.qkv(h);  // [rows, q_size + 2 * kv_size]
            const int64_t row = qkv.size(1);
            m->rope(u16(qkv), rows, m->heads + m->kv_heads, d, row,
                    static_cast<const uint16_t *>(cos), static_cast<const uint16_t *>(sin));
            // q, k and v read in place from qkv's rows (each token's row is q | k | v)
            const uint16_t *q = u16(qkv), *k = q + q_size, *v = k + kv_size;
            at::Tensor attn = at::empty({rows, q_size}, x.options());
            int rc = m->write_decode(1, k, v, kp, vp, pages, offsets, rows, q, attn.data_ptr(),
                                     table, lens, (int)rows, width, m->heads, m->kv_heads, d,
                                     page_size, page_stride, m->scale, splits, shared, row, row);
            if (rc) return rc;
            at::Tensor y = layer.o_proj(attn);
            m->add_rms_norm(u16(y), u16(x), u16(layer.norm2), u16(h), rows, m->hidden, m->eps);
            at::Tensor gate_up = layer.gate_up(h);
            at::Tensor act = at::empty({rows, gate_up.size(1) / 2}, x.options());
            m->silu_mul(u16(gate_up), u16(act), rows, act.size(1));
            delta = layer.down(act);
        }
        std::memcpy(out_data, delta.data_ptr(), sizeof(uint16_t) * rows * m->hidden);
        return 0;
    } catch (...) {
        return -1;
    }
}

}  // extern "C"
