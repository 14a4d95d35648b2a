/* The cost of a clock read, for chaos-bench-clock. Every 200 ms it prints
 *   <ns per clock_gettime(CLOCK_REALTIME)> <ns per clock_gettime(CLOCK_MONOTONIC)>
 * each the mean of 100,000 calls through libc (the vDSO, or the clock-skew stub once
 * patched), timed with the direct system call. */
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(void) {
    const int n = 100000;
    for (;;) {
        struct timespec t;
        double a = now();
        for (int i = 0; i < n; i++) clock_gettime(CLOCK_REALTIME, &t);
        double b = now();
        for (int i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &t);
        double c = now();
        printf("%.1f %.1f\n", (b - a) / n, (c - b) / n);
        fflush(stdout);
        usleep(200000);
    }
}
