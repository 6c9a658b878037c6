// Marks small inline functions that both host code and CUDA kernels call (storage conversions, the
// counter hash), so one definition serves every backend and their results match bit for bit.
#pragma once

#ifdef __CUDACC__
#define LOMO_HOST_DEVICE __host__ __device__
#else
#define LOMO_HOST_DEVICE
#endif
