/* Benchmark driver (bench/journal_bench.py): writer threads in C calling
 * jr_write, so the append path is measured without Python in the way. */
#define _GNU_SOURCE
#include "journal.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static jr_t *J;
static uint32_t BS;
static uint64_t PER;
static atomic_int stop_flag, err;
static atomic_ullong done;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *worker(void *arg)
{
    long i = (long)arg;
    void *buf;
    if (posix_memalign(&buf, 4096, BS))
        return NULL;
    memset(buf, 0x5a ^ (int)i, BS);
    uint64_t base = i * PER, slots = PER / BS, n = 0;
    while (!atomic_load(&stop_flag)) {
        int64_t rc = jr_write(J, 1, base + (n % slots) * BS, buf, BS, 0, 30000);
        if (rc < 0) {
            atomic_store(&err, (int)rc);
            break;
        }
        n++;
        atomic_fetch_add(&done, 1);
    }
    free(buf);
    return NULL;
}

/* jr_append nv|ram JOURNAL VOLUME VOLSIZE THREADS BS SECONDS WARM */
int main(int argc, char **argv)
{
    if (argc != 9)
        return 2;
    int nv = !strcmp(argv[1], "nv");
    uint64_t vsize = strtoull(argv[4], NULL, 0);
    int th = atoi(argv[5]);
    BS = strtoul(argv[6], NULL, 0);
    double secs = atof(argv[7]), warm = atof(argv[8]);
    PER = vsize / th / BS * BS;
    int rc = nv ? jr_format(argv[2], 0, 0, 0) : 0;
    if (!rc)
        rc = jr_open(nv ? argv[2] : NULL, nv ? JR_NV : JR_RAM, 256u << 20, &J);
    if (!rc)
        rc = jr_attach(J, 1, argv[3], vsize);
    if (!rc)
        rc = jr_start(J);
    if (rc) {
        fprintf(stderr, "jr setup: %d\n", rc);
        return 1;
    }
    pthread_t t[256];
    for (long i = 0; i < th && i < 256; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    usleep((useconds_t)(warm * 1e6));
    struct jr_stats s0, s1;
    jr_get_stats(J, &s0);
    unsigned long long c0 = atomic_load(&done);
    double t0 = now();
    usleep((useconds_t)(secs * 1e6));
    jr_get_stats(J, &s1);
    unsigned long long c1 = atomic_load(&done);
    double t1 = now();
    atomic_store(&stop_flag, 1);
    for (int i = 0; i < th && i < 256; i++)
        pthread_join(t[i], NULL);
    printf("{\"writes\": %llu, \"wall\": %.6f, \"appends\": %llu, \"commits\": %llu, "
           "\"full_waits\": %llu, \"dm_writes\": %llu, \"direct_io\": %d, \"err\": %d}\n",
           c1 - c0, t1 - t0, (unsigned long long)(s1.appends - s0.appends),
           (unsigned long long)(s1.commits - s0.commits),
           (unsigned long long)(s1.full_waits - s0.full_waits),
           (unsigned long long)(s1.dm_writes - s0.dm_writes), s1.direct_io, atomic_load(&err));
    return jr_close(J, 1, 120000) ? 1 : 0;
}
