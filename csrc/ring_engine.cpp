// spattn._C: the ring exchange engine and the Python bindings.
//
// RingEngine owns one ring exchange (send to the next rank of the group, receive from the previous
// one) with explicit start()/wait() so the caller computes while the block is in flight. It speaks
// to any c10d::ProcessGroup (gloo on CPU, NCCL on CUDA) through the backend-neutral send/recv API.
#include "spattn.h"

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#ifdef SPATTN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <optional>
#include <vector>

// setup.py passes the csrc/ hash as a bare hex token; stringify it here (no shell quoting needed).
#define SPATTN_STR_(x) #x
#define SPATTN_STR(x) SPATTN_STR_(x)
#ifdef SPATTN_SRC_HASH
#define SPATTN_SRC_HASH_STR SPATTN_STR(SPATTN_SRC_HASH)
#else
#define SPATTN_SRC_HASH_STR "unknown"
#endif

namespace spattn {

class RingEngine {
 public:
  RingEngine(c10::intrusive_ptr<c10d::ProcessGroup> pg, const at::Tensor& like)
      : pg_(std::move(pg)), rank_(pg_->getRank()), size_(pg_->getSize()) {
    TORCH_CHECK(like.defined(), "spattn RingEngine: `like` must be a tensor");
    // Group-local ranks: c10d's ProcessGroup::send/recv take ranks within the group.
    next_ = (rank_ + 1) % size_;
    prev_ = (rank_ - 1 + size_) % size_;
    for (auto& b : bufs_) b = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
#ifdef SPATTN_WITH_CUDA
    if (like.is_cuda()) {
      // High priority so a transfer is not queued behind long compute kernels.
      comm_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, like.device().index());
    }
#endif
  }

  RingEngine(const RingEngine&) = delete;
  RingEngine& operator=(const RingEngine&) = delete;

  ~RingEngine() {
    // Python drops the engine holding the GIL. If ours is the last reference to a gloo ProcessGroup
    // (the user already called destroy_process_group), destroying it joins gloo's worker threads,
    // which may need the GIL to free Python-owned tensors: release it meanwhile, as torch's own c10d
    // bindings do, or the process deadlocks.
    std::optional<pybind11::gil_scoped_release> nogil;
    if (Py_IsInitialized() && PyGILState_Check()) nogil.emplace();
    // Never let a transfer write into buffers that are about to be freed: wait for it (on CUDA, order
    // the comm stream after it, which is what the buffers' recordStream made the allocator wait for).
    if (in_flight_) {
      try {
        wait_works();
      } catch (...) {
      }
    }
    works_.clear();
    sending_ = at::Tensor();
    pg_.reset();
  }

  // Start sending `send` to the next rank and receiving the previous rank's block into the buffer
  // not returned by the last wait().
  void start(const at::Tensor& send) {
    TORCH_CHECK(!in_flight_, "spattn RingEngine.start called twice without wait()");
    const at::Tensor& recv = bufs_[free_];
    TORCH_CHECK(send.sizes() == recv.sizes() && send.scalar_type() == recv.scalar_type() &&
                    send.device() == recv.device(),
                "spattn RingEngine.start: message ", send.sizes(), " ", send.scalar_type(), " on ",
                send.device(), " does not match the engine's buffers ", recv.sizes(), " ",
                recv.scalar_type(), " on ", recv.device(), "; build the engine with a `like` of the message");
    sending_ = send.contiguous();  // held until wait(): the transfer reads it in the background
    works_.clear();
#ifdef SPATTN_WITH_CUDA
    if (comm_) {
      // The comm stream must see the compute stream's writes to `send` and its last reads of `recv`.
      auto compute = c10::cuda::getCurrentCUDAStream(recv.device().index());
      ready_.record(compute);
      ready_.block(*comm_);
      c10::cuda::CUDAStreamGuard guard(*comm_);
      // Allocator safety: these blocks are used on comm_ too, so the caching allocator must not hand
      // their memory to another tensor until comm_ has passed this point.
      sending_.record_stream(*comm_);
      recv.record_stream(*comm_);
      issue(recv);
      in_flight_ = true;
      return;
    }
#endif
    issue(recv);
    in_flight_ = true;
  }

  // Block until the exchange started last has finished; return the received buffer.
  at::Tensor wait() {
    TORCH_CHECK(in_flight_, "spattn RingEngine.wait called without start()");
    at::Tensor recv = bufs_[free_];
    wait_works();
#ifdef SPATTN_WITH_CUDA
    if (comm_) {  // order the caller's compute stream after the comm stream with one event
      done_.record(*comm_);
      done_.block(c10::cuda::getCurrentCUDAStream(recv.device().index()));
    }
#endif
    finish();
    return recv;
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int next() const { return next_; }
  int prev() const { return prev_; }
  bool uses_comm_stream() const {
#ifdef SPATTN_WITH_CUDA
    return comm_.has_value();
#else
    return false;
#endif
  }

 private:
  // Block until the posted transfers finish. Work::wait() orders the *current* CUDA stream after the
  // transfer, so on CUDA it runs with the comm stream current.
  void wait_works() {
#ifdef SPATTN_WITH_CUDA
    if (comm_) {
      c10::cuda::CUDAStreamGuard guard(*comm_);
      for (auto& w : works_) w->wait();
      return;
    }
#endif
    for (auto& w : works_) w->wait();
  }

  // Post the send and the receive as one batch (coalesced where the backend supports it, as
  // torch.distributed.batch_isend_irecv does) so that NCCL cannot deadlock on the ring.
  void issue(const at::Tensor& recv) {
    if (size_ == 1) {  // a ring of one: the block "arrives" from ourselves
      recv.copy_(sending_);
      return;
    }
    std::vector<at::Tensor> s{sending_}, r{recv};
    const auto dev = recv.device().type();
    auto backend = pg_->getBackend(dev);
    if (backend->supportsCoalescing()) {
      pg_->startCoalescing(dev);
      pg_->send(s, next_, /*tag=*/0);
      pg_->recv(r, prev_, /*tag=*/0);
      auto w = pg_->endCoalescing(dev);
      if (w) works_.push_back(std::move(w));
    } else {
      works_.push_back(pg_->send(s, next_, /*tag=*/0));
      works_.push_back(pg_->recv(r, prev_, /*tag=*/0));
    }
  }

  void finish() {
    works_.clear();
    sending_ = at::Tensor();
    in_flight_ = false;
    free_ ^= 1;
  }

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int rank_, size_, next_ = 0, prev_ = 0;
  at::Tensor bufs_[2];
  int free_ = 0;  // index of the buffer the next start() receives into
  bool in_flight_ = false;
  at::Tensor sending_;
  std::vector<c10::intrusive_ptr<c10d::Work>> works_;
#ifdef SPATTN_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> comm_;
  at::cuda::CUDAEvent ready_, done_;
#endif
};

}  // namespace spattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "spattn C++ extension: ring exchange engine and fused merge kernels";
  m.attr("ABI_VERSION") = spattn::kAbiVersion;
  m.attr("SOURCE_HASH") = SPATTN_SRC_HASH_STR;
  m.def("cuda_compiled", [] {
#ifdef SPATTN_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA code (comm stream, CUDA merge).");

  py::class_<spattn::RingEngine>(m, "RingEngine")
      .def(py::init<c10::intrusive_ptr<c10d::ProcessGroup>, const at::Tensor&>(), py::arg("group"),
           py::arg("like"))
      .def("start", &spattn::RingEngine::start, py::arg("send"), py::call_guard<py::gil_scoped_release>())
      .def("wait", &spattn::RingEngine::wait, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &spattn::RingEngine::rank)
      .def_property_readonly("size", &spattn::RingEngine::size)
      .def_property_readonly("next", &spattn::RingEngine::next, "next rank (group-local)")
      .def_property_readonly("prev", &spattn::RingEngine::prev, "previous rank (group-local)")
      .def_property_readonly("uses_comm_stream", &spattn::RingEngine::uses_comm_stream);

  m.def("merge_cpu_", &spattn::merge_cpu_, py::arg("out"), py::arg("lse"), py::arg("blk_out"),
        py::arg("blk_lse"), "In-place fused LSE merge on CPU (out, lse fp32 contiguous).",
        py::call_guard<py::gil_scoped_release>());
#ifdef SPATTN_WITH_CUDA
  m.def("merge_cuda_", &spattn::merge_cuda_, py::arg("out"), py::arg("lse"), py::arg("blk_out"),
        py::arg("blk_lse"), "In-place fused LSE merge on CUDA (out, lse fp32 contiguous).",
        py::call_guard<py::gil_scoped_release>());
#endif
}
