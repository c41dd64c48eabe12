/* cpu_features.c -- the CPU probe: compiled for baseline x86-64, safe to call on any x86-64 CPU. */
#include "llm_int8_cpu.h"

EXPORT int llm_int8_cpu_features(void)
{
    int f = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init(); /* F16C (half <-> float) and FMA came with or before AVX2 on every x86 CPU line */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")) {
        f |= ISA_AVX2;
        /* libgcc also checks that the OS saves the AVX-512 state (XCR0) */
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            f |= ISA_VNNI;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
            f |= FEATURE_AVX512_BF16;
    }
#endif
    return f;
}

int isa_ok(int isa)
{
    return (isa == ISA_AVX2 || isa == ISA_VNNI) && (llm_int8_cpu_features() & isa) == isa;
}
