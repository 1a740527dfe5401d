// Marks functions that both backends compile: plain C++ on the host, __host__ __device__ in CUDA.
#pragma once

#if defined(__CUDACC__)
#define SY_HD __host__ __device__ __forceinline__
#else
#define SY_HD inline
#endif
