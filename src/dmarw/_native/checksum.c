/* checksum.c: CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of any contiguous buffer.
 *
 * crc32c(data, value=0) returns the same value as dmarw.checksum's Python reference:
 * the standard CRC32C (initial and final inversion), chainable like zlib.crc32 —
 * crc32c(b, crc32c(a)) == crc32c(a + b).  Three ways, the best the CPU has picked once at
 * set-up (crc32c_select() picks another, for tests and benchmarks):
 *  - "vpclmulqdq" (x86 with AVX-512 and VPCLMULQDQ): buffers of at least 256 bytes are
 *    folded 256 bytes a step by carry-less multiplies (four 512-bit accumulators, each 128-bit
 *    lane multiplied by x^(8D+63) and x^(8D-1) mod P to move it D bytes on, which keeps its
 *    remainder), down to 16 bytes whose CRC the crc32 instruction then takes.  The crc32
 *    instruction alone stops at 8 bytes a cycle; this runs at memory speed (55 GB/s on a 4 KiB
 *    page in cache, where three crc32 lanes ran at 25 GB/s).
 *  - "sse4.2": the hardware crc32 instruction in three interleaved lanes (its latency is
 *    three cycles, its throughput one per cycle); the lanes are joined with precomputed
 *    "shift by a lane of zero bytes" tables.
 *  - "table": a portable table-driven loop (slicing by 8).
 *
 * crc32c_pages(data, page_size) returns one CRC32C per page of data (len(data) a whole number
 * of pages), as little-endian u32s: the migration stream's per-page check.  Folded, page by
 * page; with SSE4.2 only, three pages at once, one per lane (independent CRCs need no
 * joining), taken a third of the buffer apart (bench/migration_check.py measures each).
 *
 * No lock: the function reads the caller's buffer only and touches no shared state (the
 * tables and constants are written once at module set-up, before any call; crc32c_select
 * is for a single-threaded caller).  The GIL is released for
 * buffers of at least gil_threshold bytes; a caller that changes the buffer meanwhile
 * gets the checksum of some mix of old and new bytes, never a crash.
 */
#include "dmarw.h"

#define POLY 0x82F63B78u
/* bytes per lane of the 3-way loop: long lanes first (long streams keep the hardware
 * prefetcher ahead: 2 KiB lanes ran at half the speed on 64 MiB), then short ones for
 * the rest; measured by bench/migration_check.py */
#define LANE_LONG 32768
#define LANE_SHORT 2048

static uint32_t table[8][256];     /* slicing-by-8 tables of the portable path */
static uint32_t shift_long[4][256];  /* raw state -> the state after LANE_LONG zero bytes */
static uint32_t shift_short[4][256]; /* ... after LANE_SHORT zero bytes */
enum { IMPL_TABLE, IMPL_SSE42, IMPL_FOLD };
static const char *const impl_names[] = {"table", "sse4.2", "vpclmulqdq"};
static int impl;      /* the one in use */
static int impl_best; /* the best this CPU has */
#define FOLD_MIN 256  /* bytes: shorter buffers take the crc32 instruction */

/* raw CRC (no inversions) of n bytes, the portable way */
static uint32_t
crc_table(uint32_t c, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
            table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^
            table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

static inline uint32_t
shift(const uint32_t (*t)[256], uint32_t c)
{
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

static void
shift_init(uint32_t (*t)[256], size_t lane)
{
    /* the shift is linear in the state: the image of each state bit, then per byte */
    static const unsigned char zeros[LANE_LONG];
    uint32_t basis[32];
    for (int b = 0; b < 32; b++)
        basis[b] = crc_table(1u << b, zeros, lane);
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 256; i++) {
            uint32_t c = 0;
            for (int j = 0; j < 8; j++)
                if (i & (1 << j))
                    c ^= basis[8 * k + j];
            t[k][i] = c;
        }
}

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <nmmintrin.h>

/* whole blocks of three lanes; returns the bytes done, *state updated */
__attribute__((target("sse4.2"))) static inline size_t
crc_hw_3way(uint64_t *state, const unsigned char *p, size_t n, size_t lane, const uint32_t (*t)[256])
{
    uint64_t a = *state;
    size_t done = 0;
    while (n - done >= 3 * lane) {
        uint64_t b = 0, d = 0;
        const unsigned char *q = p + done, *end = q + lane;
        while (q < end) {
            uint64_t w0, w1, w2;
            memcpy(&w0, q, 8);
            memcpy(&w1, q + lane, 8);
            memcpy(&w2, q + 2 * lane, 8);
            a = _mm_crc32_u64(a, w0);
            b = _mm_crc32_u64(b, w1);
            d = _mm_crc32_u64(d, w2);
            q += 8;
        }
        /* state after lane 0 | lane 1 | lane 2 (the raw CRC is linear in its state) */
        a = shift(t, shift(t, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)d;
        done += 3 * lane;
    }
    *state = a;
    return done;
}

__attribute__((target("sse4.2"))) static uint32_t
crc_hw(uint32_t c, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8(c, *p++);
        n--;
    }
    uint64_t a = c;
    size_t done = crc_hw_3way(&a, p, n, LANE_LONG, (const uint32_t (*)[256])shift_long);
    p += done;
    n -= done;
    done = crc_hw_3way(&a, p, n, LANE_SHORT, (const uint32_t (*)[256])shift_short);
    p += done;
    n -= done;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        a = _mm_crc32_u64(a, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)a;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
/* three pages of n bytes (n a multiple of 8) at once, one lane each: their CRCs */
__attribute__((target("sse4.2"))) static void
crc_hw_pages3(const unsigned char *p0, const unsigned char *p1, const unsigned char *p2, size_t n,
              uint32_t *o0, uint32_t *o1, uint32_t *o2)
{
    uint64_t a = ~0u, b = ~0u, d = ~0u;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, p0 + i, 8);
        memcpy(&w1, p1 + i, 8);
        memcpy(&w2, p2 + i, 8);
        a = _mm_crc32_u64(a, w0);
        b = _mm_crc32_u64(b, w1);
        d = _mm_crc32_u64(d, w2);
    }
    *o0 = ~(uint32_t)a;
    *o1 = ~(uint32_t)b;
    *o2 = ~(uint32_t)d;
}

/* -- folding by carry-less multiplication ----------------------------------------------------
 * A 16-byte chunk D bytes before another is worth (mod P) its low qword times x^(8D+63) plus
 * its high qword times x^(8D-1), in the reflected bit order of the crc32 instruction (where a
 * carry-less product comes out one bit short, hence the 63 and the -1).  fold_k holds those
 * two multipliers for each distance used. */
enum { F16, F32, F48, F64, F128, F192, F256, NF };
static const unsigned fold_bytes[NF] = {16, 32, 48, 64, 128, 192, 256};
static uint64_t fold_k[NF][2];

/* x^e mod P as a reflected 64-bit multiplier (degree d at bit 63 - d) */
static uint64_t
xpow_mod(unsigned e)
{
    uint64_t r = 1; /* normal bit order: P = x^32 + 0x1EDC6F41 */
    for (unsigned i = 0; i < e; i++) {
        r <<= 1;
        if (r >> 32)
            r ^= 0x11EDC6F41ull;
    }
    uint64_t out = 0;
    for (int d = 0; d < 32; d++)
        if (r >> d & 1)
            out |= 1ull << (63 - d);
    return out;
}

#define FOLD_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2")))

FOLD_TARGET static inline __m512i
fold512(__m512i x, __m512i k, __m512i next)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                     next, 0x96);
}

FOLD_TARGET static inline __m128i
fold128(__m128i x, __m128i k, __m128i next)
{
    return _mm_ternarylogic_epi64(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11), next, 0x96);
}

/* Lines PF_AHEAD bytes on are prefetched while a step folds: the hardware prefetcher stops at
 * each 4 KiB page, so each page read from cold RAM began with misses (1 GiB of cold pages in
 * 4 MiB calls: 0.052 s without, 0.027-0.031 s two pages ahead, 0.033-0.038 s one ahead) */
#define PF_AHEAD 8192

FOLD_TARGET static inline void
prefetch256(const unsigned char *q)
{
    _mm_prefetch((const char *)q, _MM_HINT_T0);
    _mm_prefetch((const char *)q + 64, _MM_HINT_T0);
    _mm_prefetch((const char *)q + 128, _MM_HINT_T0);
    _mm_prefetch((const char *)q + 192, _MM_HINT_T0);
}

/* the raw state after n >= FOLD_MIN bytes, from raw state c; ``after``: how many bytes of
 * the caller's buffer follow these n (lines up to PF_AHEAD bytes on are prefetched, never
 * past the buffer) */
FOLD_TARGET static uint32_t
crc_fold(uint32_t c, const unsigned char *p, size_t n, size_t after)
{
    size_t pf = n + after > PF_AHEAD ? (n + after - PF_AHEAD) / 256 : 0; /* steps that prefetch */
#define KX(i) _mm_loadu_si128((const __m128i *)fold_k[i])
#define KZ(i) _mm512_broadcast_i32x4(KX(i))
    const __m512i k256 = KZ(F256), k64 = KZ(F64);
    if (pf) {
        prefetch256(p + PF_AHEAD);
        pf--;
    }
    /* the state enters as the first four bytes xored with it (the raw CRC is linear) */
    __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)c)));
    __m512i x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128), x3 = _mm512_loadu_si512(p + 192);
    p += 256;
    n -= 256;
    for (; n >= 256; p += 256, n -= 256) {
        if (pf) {
            prefetch256(p + PF_AHEAD);
            pf--;
        }
        x0 = fold512(x0, k256, _mm512_loadu_si512(p));
        x1 = fold512(x1, k256, _mm512_loadu_si512(p + 64));
        x2 = fold512(x2, k256, _mm512_loadu_si512(p + 128));
        x3 = fold512(x3, k256, _mm512_loadu_si512(p + 192));
    }
    /* four accumulators into the last one's place, then 64 bytes a step */
    __m512i x = fold512(x0, KZ(F192), fold512(x1, KZ(F128), fold512(x2, k64, x3)));
    for (; n >= 64; p += 64, n -= 64)
        x = fold512(x, k64, _mm512_loadu_si512(p));
    /* four lanes into the last one's place, then 16 bytes a step */
    __m128i y = fold128(_mm512_extracti32x4_epi32(x, 0), KX(F48),
                        fold128(_mm512_extracti32x4_epi32(x, 1), KX(F32),
                                fold128(_mm512_extracti32x4_epi32(x, 2), KX(F16), _mm512_extracti32x4_epi32(x, 3))));
    for (; n >= 16; p += 16, n -= 16)
        y = fold128(y, KX(F16), _mm_loadu_si128((const __m128i *)p));
#undef KX
#undef KZ
    /* 16 bytes left with the same remainder as everything so far: their CRC from 0 */
    uint64_t s = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(y));
    s = _mm_crc32_u64(s, (uint64_t)_mm_extract_epi64(y, 1));
    uint32_t r = (uint32_t)s;
    while (n--)
        r = _mm_crc32_u8(r, *p++);
    return r;
}
#endif

static uint32_t crc_raw(uint32_t c, const unsigned char *p, size_t n);

/* the CRC32C of each of the npages pages of ps bytes at p, into out */
static void
crc_pages(const unsigned char *p, size_t ps, size_t npages, uint32_t *out)
{
    size_t i = 0;
#if defined(__x86_64__)
    if (impl == IMPL_FOLD && ps >= FOLD_MIN) {
        for (; i < npages; i++)
            out[i] = ~crc_fold(~0u, p + i * ps, ps, (npages - i - 1) * ps);
        return;
    }
    if (impl >= IMPL_SSE42 && ps % 8 == 0) {
        size_t third = npages / 3;
        for (; i < third; i++)
            crc_hw_pages3(p + i * ps, p + (i + third) * ps, p + (i + 2 * third) * ps, ps,
                          out + i, out + i + third, out + i + 2 * third);
        i = 3 * third;
    }
#endif
    for (; i < npages; i++)
        out[i] = ~crc_raw(~0u, p + i * ps, ps);
}

static uint32_t
crc_raw(uint32_t c, const unsigned char *p, size_t n)
{
#if defined(__x86_64__)
    if (impl == IMPL_FOLD && n >= FOLD_MIN)
        return crc_fold(c, p, n, 0);
    if (impl >= IMPL_SSE42)
        return crc_hw(c, p, n);
#endif
    return crc_table(c, p, n);
}

void
checksum_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            table[t][i] = table[0][table[t - 1][i] & 0xff] ^ (table[t - 1][i] >> 8);
#if defined(__x86_64__)
    __builtin_cpu_init(); /* these also check that the OS saves the vector registers */
    if (__builtin_cpu_supports("sse4.2"))
        impl_best = IMPL_SSE42;
    if (impl_best == IMPL_SSE42 && __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq"))
        impl_best = IMPL_FOLD;
    for (int i = 0; i < NF; i++) {
        fold_k[i][0] = xpow_mod(8 * fold_bytes[i] + 63);
        fold_k[i][1] = xpow_mod(8 * fold_bytes[i] - 1);
    }
#endif
    impl = impl_best;
    shift_init(shift_long, LANE_LONG);
    shift_init(shift_short, LANE_SHORT);
}

static PyObject *
crc_call(PyObject *const *args, Py_ssize_t nargs, int portable)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32c(data, value=0): one or two arguments");
        return NULL;
    }
    uint32_t value = 0;
    if (nargs == 2) {
        unsigned long long v = PyLong_AsUnsignedLongLong(args[1]);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        if (v > 0xffffffffull) {
            PyErr_SetString(PyExc_OverflowError, "crc32c value must be in 0..0xffffffff");
            return NULL;
        }
        value = (uint32_t)v;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t c = ~value;
    if (view.len >= gil_threshold) {
        Py_BEGIN_ALLOW_THREADS
        c = portable ? crc_table(c, view.buf, (size_t)view.len) : crc_raw(c, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        c = portable ? crc_table(c, view.buf, (size_t)view.len) : crc_raw(c, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(~c);
}

PyObject *
py_crc32c(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return crc_call(args, nargs, 0);
}

PyObject *
py_crc32c_portable(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return crc_call(args, nargs, 1);
}

PyObject *
py_crc32c_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "crc32c_pages(data, page_size): two arguments");
        return NULL;
    }
    Py_ssize_t ps = PyLong_AsSsize_t(args[1]);
    if (ps == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (ps <= 0 || view.len % ps) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "crc32c_pages: %zd bytes are not a whole number of %zd-byte pages", view.len, ps);
        return NULL;
    }
    size_t npages = (size_t)(view.len / ps);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(npages * 4));
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    uint32_t *crcs = (uint32_t *)PyBytes_AS_STRING(out); /* x86 and arm64 here: little-endian */
    if (view.len >= gil_threshold) {
        Py_BEGIN_ALLOW_THREADS
        crc_pages(view.buf, (size_t)ps, npages, crcs);
        Py_END_ALLOW_THREADS
    } else {
        crc_pages(view.buf, (size_t)ps, npages, crcs);
    }
    PyBuffer_Release(&view);
    return out;
}

PyObject *
py_crc32c_impl(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(impl_names[impl]);
}

PyObject *
py_crc32c_select(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "crc32c_select(name): a str");
        return NULL;
    }
    for (int i = 0; i <= impl_best; i++)
        if (strcmp(name, impl_names[i]) == 0) {
            PyObject *was = PyUnicode_FromString(impl_names[impl]);
            if (was != NULL)
                impl = i;
            return was;
        }
    PyErr_Format(PyExc_ValueError, "crc32c_select: %R is not one of this CPU's: %s%s%s", arg, impl_names[0],
                 impl_best >= IMPL_SSE42 ? ", sse4.2" : "", impl_best >= IMPL_FOLD ? ", vpclmulqdq" : "");
    return NULL;
}
