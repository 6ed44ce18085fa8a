// Included first by the emulated builds of engine/cuda's sources (emulated_*.cc): renames what
// they define so that it cannot clash with a real CUDA build of eellm_engine in the same binary.
// eellm::cuda -> eellm::cuda_emulated, CudaBackend -> EmulatedCudaBackend, MakeCudaBackend ->
// MakeEmulatedCudaBackend, MeasureCudaGemms -> MeasureEmulatedCudaGemms (declared for tests in
// emulated_cuda_backend.h).
#pragma once

#define cuda cuda_emulated
#define CudaBackend EmulatedCudaBackend
#define MakeCudaBackend MakeEmulatedCudaBackend
#define CudaDeviceCount EmulatedCudaDeviceCount
#define CudaDeviceBusId EmulatedCudaDeviceBusId
#define MeasureCudaGemms MeasureEmulatedCudaGemms
#define NcclCommunicator EmulatedNcclCommunicator
#define UseNcclForModelParallel UseEmulatedNcclForModelParallel
