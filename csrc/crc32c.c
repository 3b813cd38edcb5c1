/* crc32c (Castagnoli): the checksum of every journal superblock and record
 * (csrc/journal.c) and of the replication stream. Its own file: the journal
 * uses it, it knows nothing of the journal. Declared in crc32c.h. */

#define _GNU_SOURCE /* clock_gettime, as journal.c */
#include "crc32c.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define JR_HAVE_SSE42 1
#endif

/* Three implementations of one function. The SSE4.2 instruction is the
 * fastest on hardware, but a CPU emulator (QEMU TCG) runs it as a helper call
 * per 8 bytes and is then slower than slicing-by-8 tables, whose loads and
 * xors it translates to host code. As the kernel does for its RAID6 and XOR
 * routines, crc_init times the candidates once and keeps the faster. */
static uint32_t crc_tab[8][256];
static uint32_t (*crc_impl)(uint32_t, const void *, size_t);
static const char *crc_impl_name; /* set by crc_init with crc_impl */

static uint32_t crc32c_byte(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    while (len--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

static uint32_t crc32c_slice8(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    while (len && ((uintptr_t)p & 7)) {
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc; /* little-endian: the first byte is the low one */
        crc = crc_tab[7][lo & 0xff] ^ crc_tab[6][(lo >> 8) & 0xff] ^
              crc_tab[5][(lo >> 16) & 0xff] ^ crc_tab[4][lo >> 24] ^ crc_tab[3][hi & 0xff] ^
              crc_tab[2][(hi >> 8) & 0xff] ^ crc_tab[1][(hi >> 16) & 0xff] ^ crc_tab[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "crc32c_slice8 assumes little-endian");

#ifdef JR_HAVE_SSE42
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf,
                                                             size_t len)
{
    const unsigned char *p = buf;
    uint64_t c = crc;
    while (len && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
    while (len--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}

/* Best of a few runs over 64 KiB, in ns. */
static uint64_t crc_time(uint32_t (*f)(uint32_t, const void *, size_t), const void *buf,
                         size_t len)
{
    uint64_t best = UINT64_MAX;
    volatile uint32_t sink = 0;
    for (int r = 0; r < 3; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        sink ^= f(~0u, buf, len);
        clock_gettime(CLOCK_MONOTONIC, &b);
        uint64_t ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)b.tv_nsec -
                      (uint64_t)a.tv_nsec;
        if (ns < best)
            best = ns;
    }
    (void)sink;
    return best;
}
#endif

static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        crc_tab[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_tab[t][i] = (crc_tab[t - 1][i] >> 8) ^ crc_tab[0][crc_tab[t - 1][i] & 0xff];
    crc_impl = crc32c_slice8;
    crc_impl_name = "slice8";
#ifdef JR_HAVE_SSE42
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        static unsigned char probe[64 << 10];
        for (size_t i = 0; i < sizeof probe; i++)
            probe[i] = (unsigned char)(i * 131u + 7u);
        if (crc_time(crc32c_hw, probe, sizeof probe) <=
            crc_time(crc32c_slice8, probe, sizeof probe)) {
            crc_impl = crc32c_hw;
            crc_impl_name = "sse4.2";
        }
    }
#endif
}

const char *jr_crc32c_impl(void)
{
    pthread_once(&crc_once, crc_init);
    return crc_impl_name;
}

uint32_t jr_crc32c_variant(int which, const void *buf, size_t len)
{
    pthread_once(&crc_once, crc_init);
    switch (which) {
    case 1:
        return ~crc32c_slice8(~0u, buf, len);
#ifdef JR_HAVE_SSE42
    case 2:
        if (__builtin_cpu_supports("sse4.2"))
            return ~crc32c_hw(~0u, buf, len);
        return ~crc32c_byte(~0u, buf, len);
#endif
    default:
        return ~crc32c_byte(~0u, buf, len);
    }
}

uint32_t jr_crc32c_update(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&crc_once, crc_init);
    return crc_impl(crc, buf, len);
}

uint32_t jr_crc32c(const void *buf, size_t len)
{
    return ~jr_crc32c_update(~0u, buf, len);
}

uint32_t jr_crc32c_table(const void *buf, size_t len)
{
    return jr_crc32c_variant(0, buf, len);
}
