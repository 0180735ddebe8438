// oneDNN 2-D convolutions for XLA:CPU, as XLA FFI handlers (built by pyramidnet_jax/onednn.py).
//
// XLA's CPU convolutions are 2x (forward) to 17x (weight gradient) slower than oneDNN's at
// PyramidNet's odd channel widths (docs/benchmarks.md). These handlers run oneDNN's forward,
// backward-data and backward-weights primitives on XLA's buffers in place: activations NHWC,
// kernels HWIO, float32, symmetric zero padding, square kernels and strides, and feature groups
// as XLA defines them (kernel (k, k, in / groups, out); output channel o is in group
// o / (out / groups)).
//
//   forward:          (x, kernel) -> y
//   backward data:    (dy, kernel) -> dx
//   backward weights: (x, dy) -> dkernel
//
// Primitives are created once per shape and thread (XLA may call from several threads) and
// reused; a kernel in oneDNN's preferred blocked layout goes through a reorder.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Tag = dnnl::memory::format_tag;
using Type = dnnl::memory::data_type;

namespace {

enum Mode : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

struct Plan {
  dnnl::primitive conv;
  dnnl::memory::desc x_md, y_md, kernel_md;  // The caller's layouts.
  bool reorder = false;                       // oneDNN wants the kernel in another layout.
  dnnl::reorder to_onednn, from_onednn;
  dnnl::memory onednn_kernel;
  std::vector<uint8_t> scratchpad;
  dnnl::memory scratchpad_memory;
};

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t>;

// XLA's HWIO kernel as oneDNN's logical (out, in, kh, kw), or (groups, out / groups,
// in / groups, kh, kw), with the strides of its real layout.
dnnl::memory::desc HwioKernel(int64_t cout, int64_t cin, int64_t k, int64_t groups) {
  const int64_t cin_g = cin / groups, cout_g = cout / groups;
  const int64_t kw_stride = cin_g * cout, kh_stride = k * kw_stride;
  if (groups == 1) {
    return dnnl::memory::desc({cout, cin, k, k}, Type::f32, {1, cout, kh_stride, kw_stride});
  }
  return dnnl::memory::desc({groups, cout_g, cin_g, k, k}, Type::f32,
                            {cout_g, 1, cout, kh_stride, kw_stride});
}

dnnl::memory::desc AnyKernel(int64_t cout, int64_t cin, int64_t k, int64_t groups) {
  if (groups == 1) return dnnl::memory::desc({cout, cin, k, k}, Type::f32, Tag::any);
  return dnnl::memory::desc({groups, cout / groups, cin / groups, k, k}, Type::f32, Tag::any);
}

Plan& GetPlan(Mode mode, int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k,
              int64_t stride, int64_t pad, int64_t groups) {
  thread_local std::map<Key, std::unique_ptr<Plan>> plans;
  Key key{mode, n, h, w, cin, cout, k, stride, pad, groups};
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;

  auto plan = std::make_unique<Plan>();
  const int64_t ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  const dnnl::memory::dims strides{stride, stride}, pad_l{pad, pad};
  // XLA's explicit (pad, pad) may leave the last rows unread at stride 2; oneDNN wants the
  // right padding that gives the same output size.
  const dnnl::memory::dims pad_r{(ho - 1) * stride + k - h - pad, (wo - 1) * stride + k - w - pad};
  plan->x_md = dnnl::memory::desc({n, cin, h, w}, Type::f32, Tag::nhwc);
  plan->y_md = dnnl::memory::desc({n, cout, ho, wo}, Type::f32, Tag::nhwc);
  plan->kernel_md = HwioKernel(cout, cin, k, groups);
  const dnnl::memory::desc any_kernel = AnyKernel(cout, cin, k, groups);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  const auto forward = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      plan->x_md, any_kernel, plan->y_md, strides, pad_l, pad_r, attr);
  dnnl::memory::desc onednn_kernel_md, scratchpad_md;
  if (mode == kForward) {
    onednn_kernel_md = forward.weights_desc();
    scratchpad_md = forward.scratchpad_desc();
    plan->conv = dnnl::convolution_forward(forward);
  } else if (mode == kBackwardData) {
    const auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, plan->x_md, any_kernel, plan->y_md,
        strides, pad_l, pad_r, forward, attr);
    onednn_kernel_md = pd.weights_desc();
    scratchpad_md = pd.scratchpad_desc();
    plan->conv = dnnl::convolution_backward_data(pd);
  } else {
    const auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, plan->x_md, any_kernel, plan->y_md,
        strides, pad_l, pad_r, forward, attr);
    onednn_kernel_md = pd.diff_weights_desc();
    scratchpad_md = pd.scratchpad_desc();
    plan->conv = dnnl::convolution_backward_weights(pd);
  }
  plan->scratchpad.resize(scratchpad_md.get_size());
  plan->scratchpad_memory = dnnl::memory(scratchpad_md, Engine(), plan->scratchpad.data());
  plan->reorder = onednn_kernel_md != plan->kernel_md;
  if (plan->reorder) {
    plan->onednn_kernel = dnnl::memory(onednn_kernel_md, Engine());
    if (mode == kBackwardWeights) {
      plan->from_onednn = dnnl::reorder(plan->onednn_kernel, dnnl::memory(plan->kernel_md, Engine(), nullptr));
    } else {
      plan->to_onednn = dnnl::reorder(dnnl::memory(plan->kernel_md, Engine(), nullptr), plan->onednn_kernel);
    }
  }
  return *plans.emplace(key, std::move(plan)).first->second;
}

ffi::Error Run(Mode mode, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, int64_t stride, int64_t pad, int64_t groups) {
  const auto x_dims = mode == kBackwardData ? out->dimensions() : a.dimensions();
  const auto kernel_dims = mode == kBackwardWeights ? out->dimensions() : b.dimensions();
  if (x_dims.size() != 4 || kernel_dims.size() != 4 || kernel_dims[0] != kernel_dims[1] ||
      stride < 1 || pad < 0 || groups < 1 || x_dims[3] != kernel_dims[2] * groups ||
      kernel_dims[3] % groups) {
    return ffi::Error::InvalidArgument(
        "onednn_conv: expects NHWC activations, a square HWIO kernel of in / groups inputs, "
        "out divisible by groups, stride >= 1, pad >= 0");
  }
  try {
    Plan& plan = GetPlan(mode, x_dims[0], x_dims[1], x_dims[2], x_dims[3], kernel_dims[3],
                         kernel_dims[0], stride, pad, groups);
    dnnl::engine& engine = Engine();
    dnnl::stream& stream = Stream();
    if (mode == kBackwardWeights) {
      dnnl::memory x(plan.x_md, engine, a.typed_data()), dy(plan.y_md, engine, b.typed_data());
      dnnl::memory dkernel(plan.kernel_md, engine, out->typed_data());
      plan.conv.execute(stream, {{DNNL_ARG_SRC, x},
                                 {DNNL_ARG_DIFF_DST, dy},
                                 {DNNL_ARG_DIFF_WEIGHTS, plan.reorder ? plan.onednn_kernel : dkernel},
                                 {DNNL_ARG_SCRATCHPAD, plan.scratchpad_memory}});
      if (plan.reorder) plan.from_onednn.execute(stream, plan.onednn_kernel, dkernel);
    } else {
      dnnl::memory kernel(plan.kernel_md, engine, b.typed_data());
      if (plan.reorder) plan.to_onednn.execute(stream, kernel, plan.onednn_kernel);
      dnnl::memory onednn_kernel = plan.reorder ? plan.onednn_kernel : kernel;
      if (mode == kForward) {
        dnnl::memory x(plan.x_md, engine, a.typed_data());
        dnnl::memory y(plan.y_md, engine, out->typed_data());
        plan.conv.execute(stream, {{DNNL_ARG_SRC, x},
                                   {DNNL_ARG_WEIGHTS, onednn_kernel},
                                   {DNNL_ARG_DST, y},
                                   {DNNL_ARG_SCRATCHPAD, plan.scratchpad_memory}});
      } else {
        dnnl::memory dy(plan.y_md, engine, a.typed_data());
        dnnl::memory dx(plan.x_md, engine, out->typed_data());
        plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, dy},
                                   {DNNL_ARG_WEIGHTS, onednn_kernel},
                                   {DNNL_ARG_DIFF_SRC, dx},
                                   {DNNL_ARG_SCRATCHPAD, plan.scratchpad_memory}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// One handler per mode; the operands are as listed at the top of this file.
template <Mode mode>
ffi::Error Handler(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> out, int64_t stride, int64_t pad, int64_t groups) {
  return Run(mode, a, b, out, stride, pad, groups);
}

}  // namespace

#define PYRAMIDNET_BIND_CONV                 \
  ffi::Ffi::Bind()                           \
      .Arg<ffi::Buffer<ffi::F32>>()          \
      .Arg<ffi::Buffer<ffi::F32>>()          \
      .Ret<ffi::Buffer<ffi::F32>>()          \
      .Attr<int64_t>("stride")               \
      .Attr<int64_t>("pad")                  \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PyramidnetOnednnConvForward, Handler<kForward>,
                              PYRAMIDNET_BIND_CONV);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyramidnetOnednnConvBackwardData, Handler<kBackwardData>,
                              PYRAMIDNET_BIND_CONV);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PyramidnetOnednnConvBackwardWeights, Handler<kBackwardWeights>,
                              PYRAMIDNET_BIND_CONV);
