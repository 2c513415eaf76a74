/* A tight loop of one syscall: ns per call, the best of 7 passes (bench/syscall_cost.py).
 *   syscall_loop N   ->  "<ns per write(2) of 1 byte to /dev/null> <ns per getppid(2)>"
 * write(2) is a traced data syscall on an untracked fd (what every process pays); getppid(2)
 * is traced by nothing (what any attached syscall tracepoint costs every syscall). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 300000;
    int fd = open("/dev/null", O_WRONLY);
    char b = 0;
    double best_w = 1e18, best_g = 1e18;
    if (fd < 0 || n <= 0)
        return 1;
    for (int r = 0; r < 7; r++) {
        double t0 = now_ns();
        for (long i = 0; i < n; i++)
            if (write(fd, &b, 1) != 1)
                return 1;
        double t1 = now_ns();
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid);
        double t2 = now_ns();
        if ((t1 - t0) / n < best_w)
            best_w = (t1 - t0) / n;
        if ((t2 - t1) / n < best_g)
            best_g = (t2 - t1) / n;
    }
    printf("%.1f %.1f\n", best_w, best_g);
    return 0;
}
