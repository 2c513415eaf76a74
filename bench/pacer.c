// pacer: a constant-rate HTTP/1.1 keep-alive load generator (the wrk2 idea, small).
//
// Request k is due at t0 + k / rate. It goes out on a free connection as soon as it is due;
// its latency is measured from when it was DUE (so a stall shows as latency instead of as a
// lower rate: no coordinated omission). One request in flight per connection, no pipelining.
//
//   pacer HOST PORT CONNECTIONS RATE SECONDS [HEADER]
//
// Prints one JSON line: sent, completed, errors, achieved rate, latency percentiles (us).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    int busy;
    uint64_t due_ns;
    char buf[4096];
    size_t len;
} conn_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

// A complete response at the start of buf? Returns its length, 0 if incomplete, -1 bad.
static long response_len(const char *buf, size_t len) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - buf) + 4;
    long body = 0;
    const char *cl = memmem(buf, head, "Content-Length:", 15);
    if (cl) body = strtol(cl + 15, NULL, 10);
    else if (memmem(buf, head, "chunked", 7)) return -1;
    if (head + (size_t)body > len) return 0;
    return (long)(head + (size_t)body);
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: pacer HOST PORT CONNECTIONS RATE SECONDS [HEADER]\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconn = atoi(argv[3]);
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    const char *extra = argc > 6 ? argv[6] : "";
    char req[1024];
    int reqlen = snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: %s:%d\r\n%s%s\r\n", host,
                          port, extra, *extra ? "\r\n" : "");
    uint64_t total = (uint64_t)(rate * seconds);
    uint32_t *lat = calloc(total + 1, sizeof(uint32_t));
    conn_t *c = calloc((size_t)nconn, sizeof(conn_t));
    int ep = epoll_create1(0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    for (int i = 0; i < nconn; i++) {
        c[i].fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c[i].fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            perror("connect");
            return 1;
        }
        int one = 1;
        setsockopt(c[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    uint64_t sent = 0, done = 0, errors = 0, nlat = 0;
    uint64_t period = (uint64_t)(1e9 / rate);
    uint64_t t0 = now_ns() + 1000000, deadline = t0 + (uint64_t)(seconds * 1e9) + 5000000000ull;
    int *freelist = malloc(sizeof(int) * (size_t)nconn), nfree = nconn;
    for (int i = 0; i < nconn; i++) freelist[i] = nconn - 1 - i;
    struct epoll_event evs[256];
    while (done + errors < total) {
        uint64_t t = now_ns();
        if (t > deadline) break;
        while (sent < total && nfree > 0 && t0 + sent * period <= t) {
            conn_t *k = &c[freelist[--nfree]];
            k->busy = 1;
            k->due_ns = t0 + sent * period;
            if (write(k->fd, req, (size_t)reqlen) != reqlen) errors++;
            sent++;
        }
        int timeout_ms = 0;
        if (sent < total && nfree > 0) {
            uint64_t next = t0 + sent * period;
            timeout_ms = next > t ? (int)((next - t) / 1000000) : 0;
        } else {
            timeout_ms = 10;
        }
        int n = epoll_wait(ep, evs, 256, timeout_ms);
        for (int j = 0; j < n; j++) {
            int i = (int)evs[j].data.u32;
            conn_t *k = &c[i];
            ssize_t r = read(k->fd, k->buf + k->len, sizeof k->buf - k->len);
            if (r <= 0) {
                fprintf(stderr, "connection %d closed\n", i);
                return 1;
            }
            k->len += (size_t)r;
            long m;
            while (k->len && (m = response_len(k->buf, k->len)) != 0) {
                if (m < 0) { errors++; k->len = 0; break; }
                uint64_t l = (now_ns() - k->due_ns) / 1000;
                lat[nlat++] = l > UINT32_MAX ? UINT32_MAX : (uint32_t)l;
                done++;
                memmove(k->buf, k->buf + m, k->len - (size_t)m);
                k->len -= (size_t)m;
                k->busy = 0;
                freelist[nfree++] = i;
            }
        }
    }
    double elapsed = (double)(now_ns() - t0) / 1e9;
    qsort(lat, nlat, sizeof(uint32_t), cmp_u32);
#define PCT(p) (nlat ? lat[(uint64_t)((double)(nlat - 1) * (p))] : 0)
    printf("{\"sent\": %llu, \"completed\": %llu, \"errors\": %llu, \"seconds\": %.3f, "
           "\"rate\": %.1f, \"p50_us\": %u, \"p99_us\": %u, \"p999_us\": %u, \"max_us\": %u}\n",
           (unsigned long long)sent, (unsigned long long)done, (unsigned long long)errors,
           elapsed, (double)done / elapsed, PCT(0.5), PCT(0.99), PCT(0.999),
           nlat ? lat[nlat - 1] : 0);
    for (int i = 0; i < nconn; i++) close(c[i].fd);
    return 0;
}
