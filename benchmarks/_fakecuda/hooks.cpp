// The native half of the fake-CUDA instrument (benchmarks/_fakecuda): lets the autograd engine
// run backward over FakeTensors whose device is "cuda" in a torch built without CUDA.
//
// Two registrations, both read by libtorch when it first needs them:
//  * a DeviceGuardImpl for CUDA. The engine asks the device of every input for its current
//    stream (InputMetadata, InputBuffer::add); c10's FakeGuardImpl answers with stream 0 and
//    does no work, which is all a fake tensor needs.
//  * CUDA hooks that report one device. at::accelerator::getAccelerator() is CUDA only if
//    hasCUDA() is true, and the engine refuses CUDA tensors when there is no accelerator.
//    getCUDAHooks() caches its object on first use, during `import torch`: this library must be
//    loaded before torch (benchmarks/_fakecuda/__main__.py does it). REGISTRY_PREFERRED lets
//    these hooks win over a real CUDA build's, if one is ever loaded first.
// No memory, streams, generators or kernels: nothing here can run a real CUDA op.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {

struct OneFakeDeviceHooks final : at::CUDAHooksInterface {
  explicit OneFakeDeviceHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};

}  // namespace

namespace at::detail {
C10_REGISTER_TYPED_CLASS_WITH_PRIORITY(CUDAHooksRegistry, "CUDAHooks", c10::REGISTRY_PREFERRED, OneFakeDeviceHooks);
}

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
