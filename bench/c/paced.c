/* Benchmark helper (bench/journal_bench.py): a paced QD1 writer called
 * through ctypes with the GIL released; jr_write on a live journal (as the
 * TCMU ring handler writes) or pwrite on a file descriptor. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int64_t (*jr_write_fn)(void *, uint32_t, uint64_t, const void *, uint32_t, uint32_t,
                               uint32_t);

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

long paced(void *fn, void *j, uint32_t vol, int fd, uint64_t size, double rate, double seconds,
           uint64_t seed, double *lat, double *svc, double *issued, long max)
{
    void *buf;
    if (posix_memalign(&buf, 4096, 4096))
        return -ENOMEM;
    memset(buf, 0xa5, 4096);
    uint64_t x = seed * 2654435761u + 88172645463325252ull, blocks = size / 4096;
    double period = 1.0 / rate, t_next = now(), end = t_next + seconds, prev_done = t_next;
    long n = 0;
    while (t_next < end && n < max) {
        double t = now();
        if (t > end)
            break;
        if (t < t_next) {
            struct timespec ts;
            ts.tv_sec = (time_t)t_next;
            ts.tv_nsec = (long)((t_next - (double)ts.tv_sec) * 1e9);
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t off = (x % blocks) * 4096;
        double ti = now();
        if (fn) {
            int64_t rc = ((jr_write_fn)fn)(j, vol, off, buf, 4096, 0, 30000);
            if (rc < 0) {
                free(buf);
                return rc;
            }
        } else if (pwrite(fd, buf, 4096, (off_t)off) != 4096) {
            free(buf);
            return -errno;
        }
        double td = now();
        lat[n] = td - (prev_done > t_next ? t_next : ti);
        svc[n] = td - ti;
        issued[n] = ti;
        n++;
        prev_done = td;
        t_next += period;
    }
    free(buf);
    return n;
}
