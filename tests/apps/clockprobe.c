/* A clock reader for the clock-skew tests. Every 20 ms it prints one line:
 *   <tag> <pid> <vdso realtime ns> <syscall realtime ns> <gettimeofday us> <time s> <vdso monotonic ns>
 * `clockprobe TAG` reads in this process; `clockprobe TAG fork MS` also forks a child MS ms
 * later that reads (tag TAG-child); `clockprobe TAG exec MS` forks a child that execs
 * `clockprobe TAG-exec`. Lines go to stdout, flushed each time. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long ns(struct timespec t) { return (long long)t.tv_sec * 1000000000LL + t.tv_nsec; }

static void loop(const char *tag) {
    for (;;) {
        struct timespec v, s, m;
        struct timeval tv;
        clock_gettime(CLOCK_REALTIME, &v);
        syscall(SYS_clock_gettime, CLOCK_REALTIME, &s);
        gettimeofday(&tv, NULL);
        time_t t = time(NULL);
        clock_gettime(CLOCK_MONOTONIC, &m);
        printf("%s %d %lld %lld %lld %lld %lld\n", tag, getpid(), ns(v), ns(s),
               (long long)tv.tv_sec * 1000000LL + tv.tv_usec, (long long)t, ns(m));
        fflush(stdout);
        usleep(20000);
    }
}

int main(int argc, char **argv) {
    const char *tag = argc > 1 ? argv[1] : "probe";
    if (argc > 3) {
        int ms = atoi(argv[3]);
        if (fork() == 0) {
            usleep(ms * 1000);
            char child[64];
            snprintf(child, sizeof child, "%s-%s", tag, argv[2]);
            if (strcmp(argv[2], "exec") == 0) {
                execl("/proc/self/exe", "clockprobe", child, (char *)NULL);
                _exit(127);
            }
            loop(child);
        }
    }
    loop(tag);
}
