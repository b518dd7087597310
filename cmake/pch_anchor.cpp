// The one translation unit of dpo_torch_pch, the target that owns the shared
// precompiled libtorch header (cmake/dpo.cmake); it has no code of its own.
