// The 16 values of the NF4 code (bitsandbytes' NF4 data type: the quantiles of a
// standard normal, normalized to [-1, 1], with an exact 0), as the fp32 literals of
// bitsandbytes' kernels. One list for the C++ code (core/nf4.cpp) and the CUDA
// kernel (core/cuda/nf4_dequant.cu), which cannot share a C++ array.
#pragma once

#define DPO_NF4_CODE_VALUES                                                              \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,              \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,         \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                  \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                   \
      0.7229568362236023f, 1.0f
