/* Round trips between two parties over a pair of pipes: two threads of one
 * process (no address-space switch) against two processes (each switch
 * changes the page tables). On real hardware the two cost about the same;
 * under software emulation (QEMU TCG) a page-table switch also empties the
 * emulated TLB. scsi_bench.py counts such switches per command.
 * Build and run: see bench/README.md ("TCMU's own ceiling"). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int ab[2], ba[2];
static long rounds, pages;
static volatile char *mem[2]; /* each party's working set */

/* what a command's handling touches: one byte per page */
static void touch(int who)
{
    for (long i = 0; i < pages; i++)
        mem[who][i * 4096]++;
}

static void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

static void *echo(void *arg)
{
    (void)arg;
    pin(0); /* one CPU: every round trip is two switches on it */
    char c;
    for (long i = 0; i < rounds; i++)
        if (read(ab[0], &c, 1) != 1 || (touch(1), write(ba[1], &c, 1)) != 1)
            exit(1);
    return NULL;
}

static double run(int processes)
{
    if (pipe(ab) || pipe(ba))
        exit(1);
    pthread_t t;
    pid_t pid = 0;
    if (processes) {
        pid = fork();
        if (pid == 0) {
            echo(NULL);
            _exit(0);
        }
    } else {
        pthread_create(&t, NULL, echo, NULL);
    }
    pin(0);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    char c = 'x';
    for (long i = 0; i < rounds; i++)
        if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1 || (touch(0), 0))
            exit(1);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (processes)
        waitpid(pid, NULL, 0);
    else
        pthread_join(t, NULL);
    close(ab[0]), close(ab[1]), close(ba[0]), close(ba[1]);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / rounds / 1000.0;
}

int main(int argc, char **argv)
{
    rounds = argc > 1 ? atol(argv[1]) : 20000;
    long sets[] = {0, 64};
    for (int k = 0; k < 2; k++) {
        pages = sets[k];
        for (int w = 0; w < 2; w++)
            mem[w] = calloc((size_t)(pages + 1), 4096);
        for (int rep = 0; rep < 3; rep++) {
            double th = run(0), pr = run(1);
            printf("%ld pages touched per side: round trip threads %.1f us, processes %.1f us, "
                   "ratio %.2f\n", pages, th, pr, pr / th);
        }
    }
    return 0;
}
