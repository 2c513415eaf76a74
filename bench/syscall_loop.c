/* A tight loop of one syscall: ns per call, the best of 7 passes (bench/syscall_cost.py).
 *   syscall_loop N  ->  "<ns per write(2)> <ns per getppid(2)> <ns per pair> <ns per corked write>"
 * write(2) of 1 byte to /dev/null is a traced data syscall on an untracked fd (what every
 * process pays); getppid(2) is traced by nothing (what any attached syscall tracepoint costs
 * every syscall). The last two run on a loopback TCP connection opened after the capture
 * started, after an HTTP request head, so that the capture tracks both ends: a pair is a
 * 1-byte write(2) and read(2) across it (two tracked data syscalls and the TCP round trip,
 * N/8 pairs); a corked write is a 1-byte write(2) with TCP_CORK set, the bytes read back
 * 4 KiB at a time (one tracked data syscall that moves no packet, N of them). Where the
 * daemon does not read its ring, each tracked syscall takes the kernel's shedding path. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BATCH 4096

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* A connected loopback pair: *c the client end, *s the accepted end. */
static int tcp_pair(int *c, int *s) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int one = 1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) ||
        getsockname(l, (struct sockaddr *)&a, &len))
        return -1;
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (*c < 0 || connect(*c, (struct sockaddr *)&a, sizeof(a)))
        return -1;
    *s = accept(l, NULL, NULL);
    close(l);
    if (*s < 0)
        return -1;
    setsockopt(*c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return 0;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 300000;
    int fd = open("/dev/null", O_WRONLY);
    int c, s;
    char b = 0, head[256];
    const char req[] = "POST /loop HTTP/1.1\r\nHost: loop\r\nContent-Length: 100000000000\r\n\r\n";
    double best_w = 1e18, best_g = 1e18, best_p = 1e18, best_c = 1e18;
    int one = 1, zero = 0;
    static char sink[BATCH];
    if (fd < 0 || n <= 0 || tcp_pair(&c, &s))
        return 1;
    if (write(c, req, sizeof(req) - 1) != sizeof(req) - 1 ||
        read(s, head, sizeof(req) - 1) != sizeof(req) - 1)
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
        for (long i = 0; i < n / 8; i++)
            if (write(c, &b, 1) != 1 || read(s, &b, 1) != 1)
                return 1;
        double t3 = now_ns();
        for (long i = 0; i < n; i += BATCH) {
            setsockopt(c, IPPROTO_TCP, TCP_CORK, &one, sizeof(one));
            for (int j = 0; j < BATCH; j++)
                if (write(c, &b, 1) != 1)
                    return 1;
            setsockopt(c, IPPROTO_TCP, TCP_CORK, &zero, sizeof(zero));
            for (long got = 0; got < BATCH;) {
                long k = read(s, sink, sizeof(sink));
                if (k <= 0)
                    return 1;
                got += k;
            }
        }
        double t4 = now_ns();
        if ((t4 - t3) / n < best_c)
            best_c = (t4 - t3) / n;
        if ((t1 - t0) / n < best_w)
            best_w = (t1 - t0) / n;
        if ((t2 - t1) / n < best_g)
            best_g = (t2 - t1) / n;
        if ((t3 - t2) / (n / 8) < best_p)
            best_p = (t3 - t2) / (n / 8);
    }
    printf("%.1f %.1f %.1f %.1f\n", best_w, best_g, best_p, best_c);
    return 0;
}
