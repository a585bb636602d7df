// Which SIMD code paths a kernel core compiles, one set of macros per ISA level.
//
// Kernel sources test these instead of the compiler's __AVX512*__ macros, so the AVX-512
// paths can also be compiled for AVX2 hardware with the intrinsics emulated by SIMDe
// (CMake option THRIFTY_EMULATE_AVX512, tools/test_avx512_emulated.sh). A normal build
// never defines THRIFTY_EMULATED_*, so there each macro is exactly the compiler's.
//   THRIFTY_AVX512       AVX-512 F/BW/VL/DQ intrinsics   (__AVX512F__)
//   THRIFTY_AVX512_BF16  AVX-512 BF16 conversions/dots    (__AVX512BF16__)
//   THRIFTY_AVX512_VNNI  AVX-512 VNNI integer dots         (__AVX512VNNI__)
#pragma once

#if defined(THRIFTY_EMULATED_AVX512) && defined(__AVX512F__)
#error "THRIFTY_EMULATED_AVX512 is for compiling the AVX-512 paths without -mavx512f"
#endif

#if defined(__AVX512F__) || defined(THRIFTY_EMULATED_AVX512)
#define THRIFTY_AVX512 1
#endif
#if defined(__AVX512BF16__) || defined(THRIFTY_EMULATED_AVX512BF16)
#define THRIFTY_AVX512_BF16 1
#endif
#if defined(__AVX512VNNI__) || defined(THRIFTY_EMULATED_AVX512VNNI)
#define THRIFTY_AVX512_VNNI 1
#endif
