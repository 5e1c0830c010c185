// XLA FFI handlers running a 2-D matmul (+ optional bias) with oneDNN on the CPU.
//
//   koclip_onednn_matmul       (x [M, K], w [K, N])          -> y [M, N]
//   koclip_onednn_matmul_bias  (x [M, K], w [K, N], b [N])   -> y [M, N] = act(x w + b)
//
// `activation` (bias handler) is applied by oneDNN as a post-op on the float32 accumulator:
// 0 none, 1 GELU (erf), 2 GELU (tanh), 3 x * sigmoid(alpha x) (swish; CLIP's quick_gelu has
// alpha 1.702), 4 ReLU, 5 tanh.
//
// x and w are both float32 or both bfloat16; b is float32 or bfloat16; y is float32 or bfloat16
// (oneDNN accumulates in float32 and rounds once at the end). All buffers are dense row-major,
// which is what jax.ffi.ffi_call hands over by default. Built by koclip/modeling/onednn/__init__.py
// with g++ against the oneDNN headers and libdnnl; see that file for when it is used.
//
// Primitives are cached by (M, K, N, types, bias). Two ways to use the cores:
// - parts = 0: one oneDNN call on all of OpenMP's threads (oneDNN's own threading). Calls are
//   serialised (XLA may run independent thunks, e.g. the q/k/v projections, at once on its threads).
// - parts = P > 0: the rows are cut into P blocks, each a single-threaded oneDNN call (each packs
//   all of w), run on XLA's own intra-op thread pool (the FFI ThreadPool) and the calling thread:
//   no second pool of threads competing with XLA's. (Blocks of columns would pack w once, but
//   oneDNN 3.2 runs a strided w with its non-AMX gemm.) The caller runs every block no pool thread has started yet, so a busy
//   pool never deadlocks it.
// P comes from the `parts` attribute (koclip/modeling/onednn/__init__.py).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// m, k, n, x/w type, y type, bias type (undef: none), single-threaded, activation, alpha
using Key = std::tuple<int64_t, int64_t, int64_t, int, int, int, bool, int64_t, float>;

std::mutex& Lock() {
  static std::mutex m;
  return m;
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Entry {
  dnnl::matmul prim;
  dnnl::memory::desc scratch;  // scratchpad_mode::user: each call brings its own
};

std::map<Key, Entry>& Cache() {
  static std::map<Key, Entry> cache;
  return cache;
}

bool ToDnnl(ffi::DataType t, dnnl::memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32:
      *out = dnnl::memory::data_type::f32;
      return true;
    case ffi::DataType::BF16:
      *out = dnnl::memory::data_type::bf16;
      return true;
    default:
      return false;
  }
}

struct Operands {
  dnnl::memory::data_type xt, wt, yt, bt;
  int64_t k, n;
  const char* x;
  const char* w;
  const char* b;
  char* y;
  size_t x_row, y_row;  // bytes per row of x and y
  int64_t activation;
  float alpha;
};

bool Activation(int64_t code, dnnl::algorithm* alg) {
  switch (code) {
    case 1: *alg = dnnl::algorithm::eltwise_gelu_erf; return true;
    case 2: *alg = dnnl::algorithm::eltwise_gelu_tanh; return true;
    case 3: *alg = dnnl::algorithm::eltwise_swish; return true;
    case 4: *alg = dnnl::algorithm::eltwise_relu; return true;
    case 5: *alg = dnnl::algorithm::eltwise_tanh; return true;
    default: return false;
  }
}

// One oneDNN matmul over rows [row, row + m) of x and y, on the calling thread's OpenMP setting
// (single_thread: one thread).
void MatmulBlock(const Operands& op, int64_t row, int64_t m, bool single_thread) {
  // This thread's OpenMP ICV: oneDNN plans and runs the block on one thread; restored on return.
  struct Threads {
    int saved = omp_get_max_threads();
    bool set;
    explicit Threads(bool one) : set(one) { if (set) omp_set_num_threads(1); }
    ~Threads() { if (set) omp_set_num_threads(saved); }
  } threads(single_thread);
  using tag = dnnl::memory::format_tag;
  dnnl::memory::desc x_md({m, op.k}, op.xt, tag::ab), w_md({op.k, op.n}, op.wt, tag::ab),
      y_md({m, op.n}, op.yt, tag::ab);
  dnnl::memory::desc b_md;
  if (op.b != nullptr) b_md = dnnl::memory::desc({1, op.n}, op.bt, tag::ab);
  Key key{m, op.k, op.n, static_cast<int>(op.xt), static_cast<int>(op.yt), static_cast<int>(op.bt), single_thread,
          op.activation, op.alpha};
  Entry entry;
  {
    std::lock_guard<std::mutex> guard(Lock());
    auto& cache = Cache();
    auto it = cache.find(key);
    if (it == cache.end()) {
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per call: calls may run at once
      dnnl::algorithm alg;
      if (Activation(op.activation, &alg)) {
        dnnl::post_ops post;
        post.append_eltwise(alg, op.alpha, 0.f);
        attr.set_post_ops(post);
      }
      dnnl::matmul::primitive_desc pd = op.b != nullptr
          ? dnnl::matmul::primitive_desc(Engine(), x_md, w_md, b_md, y_md, attr)
          : dnnl::matmul::primitive_desc(Engine(), x_md, w_md, y_md, attr);
      it = cache.emplace(key, Entry{dnnl::matmul(pd), pd.scratchpad_desc()}).first;
    }
    entry = it->second;
  }
  std::vector<char> scratch(entry.scratch.get_size());
  dnnl::stream stream(Engine());
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, dnnl::memory(x_md, Engine(), const_cast<char*>(op.x + row * op.x_row))},
      {DNNL_ARG_WEIGHTS, dnnl::memory(w_md, Engine(), const_cast<char*>(op.w))},
      {DNNL_ARG_DST, dnnl::memory(y_md, Engine(), op.y + row * op.y_row)},
      {DNNL_ARG_SCRATCHPAD, dnnl::memory(entry.scratch, Engine(), scratch.data())}};
  if (op.b != nullptr)
    args.emplace(DNNL_ARG_BIAS, dnnl::memory(b_md, Engine(), const_cast<char*>(op.b)));
  entry.prim.execute(stream, args);
  stream.wait();
}

// Blocks of rows shared by the caller and pool tasks: whoever claims a block first runs it.
struct Blocks {
  Operands op;
  std::vector<int64_t> start;  // block i: rows [start[i], start[i + 1])
  std::vector<std::atomic<bool>> claimed;
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable cv;
  std::string error;

  Blocks(const Operands& o, int64_t m, int parts) : op(o), start(parts + 1), claimed(parts) {
    for (int i = 0; i <= parts; ++i) start[i] = m * i / parts;
    for (auto& c : claimed) c.store(false);
  }
  void RunBlock(int i) {
    if (claimed[i].exchange(true)) return;
    try {
      if (start[i + 1] > start[i]) MatmulBlock(op, start[i], start[i + 1] - start[i], true);
    } catch (const dnnl::error& e) {
      std::lock_guard<std::mutex> guard(mu);
      error = e.what();
    }
    std::lock_guard<std::mutex> guard(mu);
    ++done;
    cv.notify_all();
  }
};

ffi::Error Run(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, const ffi::AnyBuffer* b,
               ffi::Result<ffi::AnyBuffer> y, int64_t parts, int64_t activation = 0, float alpha = 0.f) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("koclip_onednn_matmul: x, w and y must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  if (wd[0] != k || yd[0] != m || yd[1] != n)
    return ffi::Error::InvalidArgument("koclip_onednn_matmul: shapes do not match [M,K] x [K,N] -> [M,N]");
  if (b != nullptr && (b->dimensions().size() != 1 || b->dimensions()[0] != n))
    return ffi::Error::InvalidArgument("koclip_onednn_matmul: bias must be [N]");
  Operands op;
  op.bt = dnnl::memory::data_type::undef;
  op.activation = activation;
  op.alpha = alpha;
  dnnl::algorithm unused;
  if (activation != 0 && !Activation(activation, &unused))
    return ffi::Error::InvalidArgument("koclip_onednn_matmul: unknown activation code");
  if (!ToDnnl(x.element_type(), &op.xt) || !ToDnnl(w.element_type(), &op.wt) || !ToDnnl(y->element_type(), &op.yt) ||
      (b != nullptr && !ToDnnl(b->element_type(), &op.bt)))
    return ffi::Error::InvalidArgument("koclip_onednn_matmul: only float32 and bfloat16 are supported");
  if (op.xt != op.wt) return ffi::Error::InvalidArgument("koclip_onednn_matmul: x and w must have one dtype");
  if (m == 0 || n == 0) return ffi::Error::Success();
  op.k = k;
  op.n = n;
  auto bytes = [](ffi::DataType t) -> size_t { return t == ffi::DataType::F32 ? 4 : 2; };
  op.x = static_cast<const char*>(x.untyped_data());
  op.w = static_cast<const char*>(w.untyped_data());
  op.b = b != nullptr ? static_cast<const char*>(b->untyped_data()) : nullptr;
  op.y = static_cast<char*>(y->untyped_data());
  op.x_row = static_cast<size_t>(k) * bytes(x.element_type());
  op.y_row = static_cast<size_t>(n) * bytes(y->element_type());

  try {
    if (parts == 0) {  // oneDNN's own OpenMP threads, one call at a time
      static std::mutex serial;
      std::lock_guard<std::mutex> guard(serial);
      MatmulBlock(op, 0, m, false);
      return ffi::Error::Success();
    }
    if (parts < 0) return ffi::Error::InvalidArgument("koclip_onednn_matmul: parts must be >= 0");
    const int p = static_cast<int>(std::min<int64_t>(parts, m));
    auto blocks = std::make_shared<Blocks>(op, m, p);
    for (int i = 1; i < p; ++i) pool.Schedule([blocks, i] { blocks->RunBlock(i); });
    for (int i = 0; i < p; ++i) blocks->RunBlock(i);  // ours first, then any not yet started
    std::unique_lock<std::mutex> lock(blocks->mu);
    blocks->cv.wait(lock, [&] { return blocks->done.load() == p; });
    if (!blocks->error.empty())
      return ffi::Error::Internal("koclip_onednn_matmul: oneDNN: " + blocks->error);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("koclip_onednn_matmul: oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                  int64_t parts) {
  return Run(pool, x, w, nullptr, y, parts);
}

ffi::Error MatmulBias(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b,
                      ffi::Result<ffi::AnyBuffer> y, int64_t parts, int64_t activation, float alpha) {
  return Run(pool, x, w, &b, y, parts, activation, alpha);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KoclipOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("parts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KoclipOnednnMatmulBias, MatmulBias,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("parts")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("alpha"));

// The oneDNN version this library runs with, for reports ("3.2.0").
extern "C" const char* koclip_onednn_version() {
  static std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." + std::to_string(ver->patch);
  }();
  return v.c_str();
}
