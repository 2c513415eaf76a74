// hopwatch capture programs (bcc C).
//
// Compiled by daemon/hopwatch/capture/live.py with -D cflags only (no string templating).
// Runtime settings live in maps (config, pid/cgroup/port filters, per-connection control).
//
// Theory of operation
// -------------------
// * connect/accept/accept4 exits put inet connections in `conns`, keyed by (tgid, fd), and
//   emit EV_OPEN with the peer sockaddr read from user memory. close() enter removes them
//   (EV_CLOSE). sched_process_exit of a whole thread group emits EV_EXIT; userspace then
//   deletes that tgid's entries (it knows them from the events it received).
// * An fd can also be closed without close(): exec closes close-on-exec fds (EV_EXEC;
//   userspace deletes the entries whose fd no longer holds the socket), dup2/dup3 replace
//   one (their enter programs end it, as close() does), close_range() closes a range
//   (EV_CLOSE_RANGE: userspace ends the connections it tracks in it).
//   A connect/accept that succeeds on an fd still in `conns` replaces the entry, or, when
//   the new connection is left out, drops it with an EV_CLOSE.
// * `exclude_ports`: a connect() to an excluded port is left out here, and so is an accept()
//   on a listening socket this process bound to one (bind() enter records (tgid, fd) ->
//   port while ports are excluded). A left-out connection's fd is marked in `unknown_seen`
//   so that its data does not come back as an unknown fd; userspace judges the rest.
// * Data syscalls: the exit program takes (fd, buffer/iovec/msghdr pointer, count) from the
//   register frame the syscall saved at its entry (ARGS_FROM_REGS, x86-64: no enter
//   program, so half the tracepoint runs), or from what the enter program stashed per
//   thread (elsewhere); for fds present in `conns` that pass the filters it copies
//   the `ret` bytes that really moved, walking iovecs (and mmsghdr arrays) with one flat,
//   constant-bounded cursor loop, packing them into CHUNK_SIZE records in a per-CPU scratch
//   buffer and emitting each record with bpf_ringbuf_output (so a 1-byte write costs a
//   small record, not a whole chunk slot).
// * Every direction of a connection counts its bytes (`offset`). Userspace may ask, through
//   `ctl`, to skip everything below an absolute offset of a direction (bodies, DATA frames);
//   skipped bytes are reported in the record, never copied. Absolute offsets avoid the race
//   of a relative "skip N" set while earlier chunks are still in flight.
// * The first bytes of each direction are sniffed (HTTP/1 method or status line, HTTP/2
//   preface or SETTINGS frame); a direction that is not HTTP stops costing copies: its enter
//   program returns after one map lookup.
// * Untracked fds (sockets opened before the daemon started, inherited fds) that write data
//   looking like HTTP emit at most one EV_UNKNOWN_FD per (tgid, fd); userspace checks /proc
//   and adopts them by inserting into `conns`.
// * TLS (OpenSSL): uprobes on SSL_write/SSL_read(_ex) stash (ssl, buffer) per thread; the
//   uretprobes copy the plaintext the call really moved (ret > 0; the _ex byte count from the
//   out-parameter) through the same tail-called copy chain, as EV_DATA records whose
//   `tls_id` is the SSL pointer. The socket of an SSL object is learned from the socket
//   syscall the thread makes while inside the SSL call (socket BIO: nginx, Python, curl),
//   or, for memory BIOs (Node.js), from the ciphertext the same thread writes right after
//   SSL_write or read right before SSL_read. Each new (ssl -> fd) binding is an EV_TLS_BIND
//   event; once bound, the connection's directions are marked SNIFF_TLS and its ciphertext
//   is no longer copied. Plaintext offsets count per SSL object, separate from the
//   syscall offsets of the socket. SSL_ctrl(SSL_CTRL_SET_TLSEXT_HOSTNAME) gives the SNI
//   (EV_TLS_SNI). sched_process_exec emits EV_EXEC so that userspace can attach the uprobes
//   to new binaries that embed OpenSSL.
// * Nothing here reads a kernel struct: only tracepoint arguments, user memory and helpers,
//   and (ARGS_FROM_REGS) the x86-64 syscall register frame, whose layout is the user ABI
//   (`struct user_regs_struct`'s order), reached through bpf_task_pt_regs().

#include <uapi/linux/ptrace.h>  // struct pt_regs of the uprobe programs (the uapi layout)

#ifndef CHUNK_SIZE
#define CHUNK_SIZE 8192
#endif
#ifndef MAX_CAP
#define MAX_CAP 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 4096
#endif
#ifndef CONN_MAX
#define CONN_MAX 65536
#endif
#ifndef HAVE_GROUP_DEAD
#define HAVE_GROUP_DEAD 0
#endif
// 1: the data syscalls' exit programs read the arguments from the register frame the
// syscall saved at entry (x86-64), and no enter program is attached to them; 0: the enter
// programs stash the arguments in task storage (any architecture).
#ifndef ARGS_FROM_REGS
#define ARGS_FROM_REGS 0
#endif

#define MAX_IOV 128         // iovecs walked per message
#define MAX_MMSG 16         // mmsghdr entries walked for data
#define MAX_MMSG_SUM 256    // mmsghdr entries summed for the byte count
#define MAX_CG_LEVELS 16
#define SNIFF_LEN 16
#define UNKNOWN_TRIES 4
#define UNKNOWN_DONE 255

#define EINPROGRESS_ 115
#define CLOSE_RANGE_CLOEXEC_ 4
#define BARRIER_VAR(v) asm volatile("" : "+r"(v))
#define AF_INET_ 2
#define AF_INET6_ 10

// event kinds
#define EV_DATA 1
#define EV_OPEN 2
#define EV_CLOSE 3
#define EV_EXIT 4
#define EV_UNKNOWN_FD 5
#define EV_TLS_BIND 6
#define EV_TLS_SNI 7
#define EV_EXEC 8
#define EV_CLOSE_RANGE 9  // fd: the first fd closed, tid: the last one

#define DIR_SEND 0
#define DIR_RECV 1

#define ROLE_UNKNOWN 0
#define ROLE_CLIENT 1
#define ROLE_SERVER 2

// data record flags
#define DF_FIRST 1
#define DF_LAST 2
#define DF_NODATA 4  // sendfile: the bytes never pass through user memory

// unknown-fd hints (ev_hdr.flags of EV_UNKNOWN_FD)
#define HINT_REQUEST 1
#define HINT_RESPONSE 2
#define HINT_H2 3
#define HINT_TLS 4  // written inside an SSL call: a TLS socket

// sniff state per direction
#define SNIFF_PENDING 0
#define SNIFF_HTTP 1
#define SNIFF_REJECTED 2
#define SNIFF_RESYNC 3  // adopted mid-stream: copy syscalls only once one starts like HTTP
#define SNIFF_TLS 4     // TLS: the plaintext comes from the SSL uprobes, ciphertext is not copied

// stash kinds
#define K_BUF 0
#define K_IOV 1
#define K_MSG 2
#define K_MMSG 3
#define K_NONE 4

// config flags
#define CF_PID_INCLUDE 1
#define CF_PID_ANY 2
#define CF_CG_INCLUDE 4
#define CF_CG_ANY 8
#define CF_PORT_ANY 16
#define CF_TLS_OFF 32  // the SSL uprobes do nothing (set before they are handed off to detach)

#define FILTER_INCLUDE 1
#define FILTER_EXCLUDE 2

#define CTL_IGNORE 1

// counters (index into `counters`; mirrored in live.py)
#define C_EVENTS 0
#define C_BYTES 1
#define C_RING_FULL 2
#define C_TRUNCATED_BYTES 3
#define C_FILTERED 4
#define C_SNIFF_REJECTED 5
#define C_CONN_TABLE_FULL 6
#define C_UNKNOWN_FD 7
#define C_SKIPPED_BYTES 8
#define C_TRUNCATED_SYSCALLS 9
#define C_IGNORED 10
#define C_STASH_FULL 11
#define C_TLS_CALLS 12       // SSL_read/SSL_write calls reported (plaintext)
#define C_TLS_UNBOUND 13     // ... of which the socket was not known yet at return
#define C_TLS_CIPHERTEXT 14  // syscalls on TLS connections not copied (ciphertext)
#define C_LIFECYCLE 15       // records other than data submitted (open, close, exit, TLS...)
#define C_NCOUNTERS 16

#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define TLS_NAME_LEN 256

struct ev_hdr {
    u8 kind;
    u8 dir;
    u8 flags;
    u8 role;
    s32 fd;
    u32 tgid;
    u32 tid;
    u64 ts_ns;
    char comm[16];
};

struct data_ev {
    struct ev_hdr h;
    u64 total_len;  // bytes the syscall moved
    u64 offset;     // absolute direction offset of the syscall's first byte
    u64 skipped;    // bytes at the start not copied (skip-until)
    u32 chunk_off;  // offset of this record's bytes within the copied bytes
    u32 chunk_len;
    u64 tls_id;     // TLS plaintext: the SSL object (never 0); 0 for socket syscalls
    u8 data[2 * CHUNK_SIZE];  // only [0, CHUNK_SIZE) is ever filled: the slack lets the
                              // verifier accept a masked length
};

struct conn_ev {
    struct ev_hdr h;
    u16 family;
    u16 port;  // host order
    s32 listen_fd;  // accept: the listening socket's fd (its local port is the service's); -1
    u8 addr[16];
    u64 cookie;
};

struct conn_key {
    u32 tgid;
    s32 fd;
};

struct dir_state {
    u64 offset;
    u8 sniff;
    u8 sniff_len;
    u8 pad[6];
    u8 sniff_buf[SNIFF_LEN];
};

struct conn_val {
    u64 cookie;
    u16 port;
    u8 role;
    u8 family;
    u32 pad;
    struct dir_state d[2];
};

struct ctl_val {
    u64 cookie;
    u64 skip_until[2];
    u32 flags;
    u32 pad;
    u64 tls_skip_until[2];  // the same, in the plaintext offsets of a TLS connection
};

struct cfg {
    u32 self_tgid;
    u32 flags;
    u64 cap;
};

struct conn_args {
    u64 addr;
    s32 fd;
    u32 addrlen;
    u8 role;
    u8 pad[7];
};

struct data_args {
    u64 ptr;
    u64 skip_until;
    u64 cnt;
    s32 fd;
    u8 kind;
    u8 dir;
    u8 pad[2];
};

// TLS: per-thread SSL call in progress, per-SSL-object state, SNI/bind events
struct tls_args {
    u64 ssl;
    u64 buf;
    u64 exptr;  // SSL_*_ex: the size_t out-parameter
    s32 fd;     // socket seen during the call (-1: none yet)
    u8 dir;
    u8 is_ex;
    u8 pad[2];
};

struct ssl_key {
    u32 tgid;
    u32 pad;
    u64 ssl;
};

struct ssl_val {
    u64 offset[2];  // plaintext offsets [send, recv]
    u64 cookie;     // the bound connection's cookie (an fd number is reused after close)
    s32 fd;         // -1: not bound yet
    u32 pad;
};

struct tls_ev {
    struct ev_hdr h;
    u64 ssl;
    u32 len;  // EV_TLS_SNI: bytes in name
    u32 pad;
    char name[TLS_NAME_LEN];
};

// userspace ABI (not kernel structs): iovec, msghdr, mmsghdr as the C library lays them out
struct u_iovec {
    u64 base;
    u64 len;
};
#define MSGHDR_IOV_OFF 16
#define MSGHDR_IOVLEN_OFF 24
#define MMSGHDR_SIZE 64
#define MMSGHDR_LEN_OFF 56

#ifdef PY_SIZEOF_EV_HDR
_Static_assert(sizeof(struct ev_hdr) == PY_SIZEOF_EV_HDR, "ev_hdr differs from Python");
_Static_assert(offsetof(struct data_ev, data) == PY_SIZEOF_DATA_HDR, "data_ev differs from Python");
_Static_assert(sizeof(struct conn_ev) == PY_SIZEOF_CONN_EV, "conn_ev differs from Python");
_Static_assert(sizeof(struct conn_val) == PY_SIZEOF_CONN_VAL, "conn_val differs from Python");
_Static_assert(sizeof(struct ctl_val) == PY_SIZEOF_CTL_VAL, "ctl_val differs from Python");
_Static_assert(sizeof(struct cfg) == PY_SIZEOF_CFG, "cfg differs from Python");
_Static_assert(sizeof(struct tls_ev) == PY_SIZEOF_TLS_EV, "tls_ev differs from Python");
#endif
_Static_assert(CHUNK_SIZE >= 64 && (CHUNK_SIZE & (CHUNK_SIZE - 1)) == 0, "CHUNK_SIZE: power of 2");
_Static_assert(sizeof(struct data_ev) <= 32000, "per-CPU scratch too big: lower CHUNK_SIZE");

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

// Wake-ups: each CPU wakes the reader on every WAKE_EVERY-th data record only; the reader
// also drains the ring when its wait times out. A wake-up per record costs the traced
// process (and the reader) more than the record itself at high rates. Lifecycle events
// (open, close, exit, unknown fd, TLS) wake it at once: the reader names a connection's
// process from /proc, which a short-lived client must still be in.
#ifndef WAKE_EVERY
#define WAKE_EVERY 32
#endif
// Shedding: once a record found the ring full, this CPU copies nothing until the clock
// ticks SHED_JIFFIES times (the rest of this tick: up to 4 ms at HZ=250; the reader is
// behind: the copies would be lost anyway, and the traced process pays for them). Each
// syscall not copied counts as ring_full; its bytes become a gap the reader sees. Jiffies,
// not bpf_ktime_get_ns: every data syscall checks the deadline while shedding, and reading
// the clock cost ~40 ns of a ~250 ns exit program here (bench/probe_cost.py); the coarse
// clock is not available to tracepoint programs.
#ifndef SHED_JIFFIES
#define SHED_JIFFIES 1
#endif
// This CPU's side of the ring: data records since the last wake-up, and until when it sheds.
struct ring_cpu {
    u64 shed_until;
    u32 since_wake;
    u32 pad;
};
BPF_PERCPU_ARRAY(ring_cpus, struct ring_cpu, 1);

static __always_inline struct ring_cpu *ring_cpu(void) {
    u32 zero = 0;
    return ring_cpus.lookup(&zero);
}

static __always_inline u64 rb_flags(void) {
    struct ring_cpu *r = ring_cpu();
    if (!r)
        return 0;
    u32 v = r->since_wake + 1;
    if (v >= WAKE_EVERY) {
        r->since_wake = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    r->since_wake = v;
    return BPF_RB_NO_WAKEUP;
}
BPF_HASH(conns, struct conn_key, struct conn_val, CONN_MAX);
BPF_HASH(ctl, struct conn_key, struct ctl_val, CONN_MAX);
BPF_TABLE("lru_hash", struct conn_key, u8, unknown_seen, 16384);
// While ports are excluded: the port each (tgid, fd) bound (bind() enter), so that an accept
// on a listening socket of an excluded port is left out here, as a connect() to one is (the
// accept's sockaddr is the client's). Sockets bound before the start, or by another process
// (a prefork server's parent), are not known: userspace asks the listening socket.
BPF_TABLE("lru_hash", struct conn_key, u16, bound_ports, 16384);
BPF_HASH(conn_args, u32, struct conn_args, 4096);
BPF_HASH(pid_filter, u32, u8, 4096);
BPF_HASH(cgroup_filter, u64, u8, 4096);
BPF_HASH(port_filter, u16, u8, 1024);
BPF_ARRAY(config, struct cfg, 1);
BPF_PERCPU_ARRAY(counters, u64, C_NCOUNTERS);
BPF_PERCPU_ARRAY(scratch, struct data_ev, 1);
BPF_HASH(tls_args, u32, struct tls_args, 65536);                // tid -> SSL call in progress
BPF_TABLE("lru_hash", struct ssl_key, struct ssl_val, ssl_state, 65536);
BPF_TABLE("lru_hash", u32, u64, tls_wait, 16384);               // tid -> ssl written, fd unknown
BPF_TABLE("lru_hash", u32, s32, tls_lastrd, 16384);             // tid -> last ciphertext read fd
BPF_PERCPU_ARRAY(tls_scratch, struct data_ev, 1);

// Per-thread state, in task-local storage (no hash lookup, freed with the thread): the data
// syscall between its enter and its exit, and flags that say whether the TLS maps keyed by
// thread hold anything for it, so that plain traffic never looks them up.
struct task_st {
    struct data_args a;
    u8 pending;   // a holds the syscall in progress
    u8 in_ssl;    // inside SSL_read/SSL_write: tls_args may hold the call
    u8 tls_wait;  // tls_wait may hold an SSL object waiting for its socket
    u8 pad[5];
};
BPF_TASK_STORAGE(task_sts, struct task_st);

static __always_inline struct task_st *task_state_of(struct task_struct *task, int create) {
    struct task_st init = {};
    return task_sts.task_storage_get(task, &init, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

static __always_inline struct task_st *task_state(int create) {
    return task_state_of((struct task_struct *)bpf_get_current_task_btf(), create);
}

static __always_inline void count(u32 idx, u64 n) {
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline int shedding(void) {
    struct ring_cpu *r = ring_cpu();
    if (!r || !r->shed_until)
        return 0;
    if (bpf_jiffies64() < r->shed_until)
        return 1;
    r->shed_until = 0;
    return 0;
}

static __always_inline void ring_was_full(void) {
    struct ring_cpu *r = ring_cpu();
    if (r)
        r->shed_until = bpf_jiffies64() + SHED_JIFFIES;
    count(C_RING_FULL, 1);
}

static __always_inline struct cfg *get_cfg(void) {
    u32 zero = 0;
    return config.lookup(&zero);
}

// 1 when the current task must not be observed (self, pid and cgroup filters).
static __always_inline int task_filtered(struct cfg *c, u32 tgid) {
    if (tgid == c->self_tgid)
        return 1;
    if (c->flags & CF_PID_ANY) {
        u8 *p = pid_filter.lookup(&tgid);
        if (p && *p == FILTER_EXCLUDE)
            return 1;
        if ((c->flags & CF_PID_INCLUDE) && !(p && *p == FILTER_INCLUDE))
            return 1;
    }
    if (c->flags & CF_CG_ANY) {
        // The task's cgroup or any ancestor may be named in the filter (a unit's or a
        // container's subtree).
        int included = 0;
        u64 id = bpf_get_current_cgroup_id();
        u8 *p = cgroup_filter.lookup(&id);
        if (p) {
            if (*p == FILTER_EXCLUDE)
                return 1;
            included = 1;
        }
#pragma clang loop unroll(disable)
        for (int lvl = 0; lvl < MAX_CG_LEVELS; lvl++) {
            u64 anc = bpf_get_current_ancestor_cgroup_id(lvl);
            if (anc == 0 || anc == id)
                break;
            p = cgroup_filter.lookup(&anc);
            if (p) {
                if (*p == FILTER_EXCLUDE)
                    return 1;
                included = 1;
            }
        }
        if ((c->flags & CF_CG_INCLUDE) && !included)
            return 1;
    }
    return 0;
}

static __always_inline int port_filtered(struct cfg *c, u16 port) {
    if (!(c->flags & CF_PORT_ANY))
        return 0;
    u8 *p = port_filter.lookup(&port);
    return p && *p == FILTER_EXCLUDE;
}

// ---------------------------------------------------------------------------------------
// Protocol sniff. `v` holds the first 8 bytes (little endian), `n` how many are known.
// Returns SNIFF_HTTP, SNIFF_PENDING (a prefix of something HTTP) or SNIFF_REJECTED; *hint
// says whether it looked like a request, a response or HTTP/2.

#define B8(a, b, c, d, e, f, g, h)                                                          \
    ((u64)(a) | ((u64)(b) << 8) | ((u64)(c) << 16) | ((u64)(d) << 24) | ((u64)(e) << 32) |  \
     ((u64)(f) << 40) | ((u64)(g) << 48) | ((u64)(h) << 56))

static __always_inline int tok(u64 v, u32 n, u64 t, u32 tlen) {
    u32 m = n < tlen ? n : tlen;
    u64 mask = m >= 8 ? ~0ULL : ((1ULL << (m * 8)) - 1);
    if ((v & mask) != (t & mask))
        return 0;
    return n >= tlen ? 2 : 1;
}

static __always_inline int classify(const u8 *b, u32 n, int midstream, u8 *hint) {
    u64 v = 0;
    __builtin_memcpy(&v, b, 8);
    int best = 0, r;
    *hint = HINT_REQUEST;
#define T(t, l)                                                                              \
    r = tok(v, n, t, l);                                                                     \
    if (r == 2)                                                                              \
        return SNIFF_HTTP;                                                                   \
    if (r > best)                                                                            \
        best = r;
    T(B8('G', 'E', 'T', ' ', 0, 0, 0, 0), 4)
    T(B8('P', 'O', 'S', 'T', ' ', 0, 0, 0), 5)
    T(B8('P', 'U', 'T', ' ', 0, 0, 0, 0), 4)
    T(B8('H', 'E', 'A', 'D', ' ', 0, 0, 0), 5)
    T(B8('D', 'E', 'L', 'E', 'T', 'E', ' ', 0), 7)
    T(B8('O', 'P', 'T', 'I', 'O', 'N', 'S', ' '), 8)
    T(B8('P', 'A', 'T', 'C', 'H', ' ', 0, 0), 6)
    T(B8('C', 'O', 'N', 'N', 'E', 'C', 'T', ' '), 8)
    T(B8('T', 'R', 'A', 'C', 'E', ' ', 0, 0), 6)
    *hint = HINT_H2;
    T(B8('P', 'R', 'I', ' ', '*', ' ', 'H', 'T'), 8)
    *hint = HINT_RESPONSE;
    T(B8('H', 'T', 'T', 'P', '/', '1', '.', 0), 7)
#undef T
    // An HTTP/2 frame header: length (24 bit), type, flags, stream id (31 bit). At the start
    // of a direction only the server's SETTINGS frame is plausible.
    *hint = HINT_H2;
    u32 len = ((u32)b[0] << 16) | ((u32)b[1] << 8) | b[2];
    if (n >= 9) {
        u8 type = b[3];
        if (len > 16384 || type > 9 || (b[5] & 0x80))
            return best ? SNIFF_PENDING : SNIFF_REJECTED;
        if (midstream)
            return SNIFF_HTTP;
        if (type == 4 && (len % 6) == 0 && b[4] <= 1 && b[5] == 0 && b[6] == 0 && b[7] == 0 &&
            b[8] == 0)
            return SNIFF_HTTP;
        return best ? SNIFF_PENDING : SNIFF_REJECTED;
    }
    if (best)
        return SNIFF_PENDING;
    if (n >= 1 && b[0] == 0 && (n < 2 || b[1] <= 0x40) && (n < 4 || b[3] <= 9))
        return SNIFF_PENDING;
    return SNIFF_REJECTED;
}

// ---------------------------------------------------------------------------------------
// Events without data

static __always_inline void fill_hdr(struct ev_hdr *h, u8 kind, u64 id, s32 fd) {
    h->kind = kind;
    h->dir = 0;
    h->flags = 0;
    h->role = 0;
    h->fd = fd;
    h->tgid = id >> 32;
    h->tid = (u32)id;
    h->ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

static __always_inline int emit_simple(u8 kind, u64 id, s32 fd, u8 flags, u8 dir) {
    struct ev_hdr *h = events.ringbuf_reserve(sizeof(struct ev_hdr));
    if (!h) {
        count(C_RING_FULL, 1);
        return -1;
    }
    fill_hdr(h, kind, id, fd);
    h->flags = flags;
    h->dir = dir;
    events.ringbuf_submit(h, 0);  // lifecycle events wake the reader at once
    count(C_EVENTS, 1);
    count(C_LIFECYCLE, 1);
    return 0;
}

// ---------------------------------------------------------------------------------------
// TLS: binding SSL objects to sockets

static __always_inline void tls_emit(u8 kind, u64 id, s32 fd, u64 ssl, u64 name_ptr) {
    struct tls_ev *e = events.ringbuf_reserve(sizeof(struct tls_ev));
    if (!e) {
        count(C_RING_FULL, 1);
        return;
    }
    fill_hdr(&e->h, kind, id, fd);
    e->ssl = ssl;
    e->len = 0;
    e->pad = 0;
    e->name[0] = 0;
    if (name_ptr) {
        long n = bpf_probe_read_user_str(e->name, sizeof(e->name), (void *)name_ptr);
        e->len = n > 0 ? (u32)(n - 1) : 0;
    }
    events.ringbuf_submit(e, 0);  // lifecycle events wake the reader at once
    count(C_EVENTS, 1);
    count(C_LIFECYCLE, 1);
}

// (tgid, ssl) now talks through fd: record it, tell userspace once per change.
static __always_inline void tls_bind(u64 id, u64 ssl, s32 fd, u64 cookie) {
    struct ssl_key sk = {.tgid = id >> 32, .pad = 0, .ssl = ssl};
    struct ssl_val *sv = ssl_state.lookup(&sk);
    if (sv) {
        if (sv->fd == fd && sv->cookie == cookie)
            return;
        sv->fd = fd;
        sv->cookie = cookie;
    } else {
        struct ssl_val v = {};
        v.fd = fd;
        v.cookie = cookie;
        ssl_state.update(&sk, &v);
    }
    tls_emit(EV_TLS_BIND, id, fd, ssl, 0);
}

static __always_inline void mark_tls(struct conn_val *cv) {
    cv->d[0].sniff = SNIFF_TLS;
    cv->d[1].sniff = SNIFF_TLS;
}

static __always_inline int is_cipher(u8 st) { return st == SNIFF_REJECTED || st == SNIFF_TLS; }

// A socket syscall on a tracked connection. Returns 1 when it carries TLS ciphertext (the
// caller then copies nothing).
static __always_inline int tls_note(u64 id, s32 fd, struct conn_val *cv, u8 dir,
                                    struct task_st *ts) {
    u32 tid = (u32)id;
    struct tls_args *t = ts && ts->in_ssl ? tls_args.lookup(&tid) : NULL;
    if (t) {
        // Inside SSL_read/SSL_write on this thread: this is the SSL object's socket.
        if (t->fd != fd) {
            t->fd = fd;
            tls_bind(id, t->ssl, fd, cv->cookie);
        }
        mark_tls(cv);
        return 1;
    }
    if (dir == DIR_SEND) {
        // Memory BIO (Node.js): the ciphertext of an SSL_write is written right after it.
        u64 *w = NULL;
        if (ts && ts->tls_wait) {
            ts->tls_wait = 0;
            w = tls_wait.lookup(&tid);
        }
        if (w) {
            u64 ssl = *w;
            tls_wait.delete(&tid);
            if (is_cipher(cv->d[0].sniff)) {
                tls_bind(id, ssl, fd, cv->cookie);
                mark_tls(cv);
            }
        }
        return cv->d[0].sniff == SNIFF_TLS;
    }
    // Memory BIO: the ciphertext an SSL_read decrypts was read just before, same thread.
    if (is_cipher(cv->d[1].sniff))
        tls_lastrd.update(&tid, &fd);
    return cv->d[1].sniff == SNIFF_TLS;
}

// ---------------------------------------------------------------------------------------
// connect / accept / accept4

static __always_inline int conn_enter(s32 fd, u64 addr, u64 addrlen, u8 role) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct cfg *c = get_cfg();
    if (!c || (id >> 32) == c->self_tgid)
        return 0;
    struct conn_args a = {};
    a.addr = addr;
    a.fd = fd;
    a.addrlen = (u32)addrlen;
    a.role = role;
    conn_args.update(&tid, &a);
    return 0;
}

// A connect/accept that succeeded but is not tracked: whatever `conns` still holds for its
// fd belonged to a file that was closed without close(): by exec (close-on-exec), or by
// close_range() before userspace ended it.
static __always_inline int drop_stale(u64 id, s32 fd) {
    struct conn_key k = {.tgid = id >> 32, .fd = fd};
    if (!conns.lookup(&k))
        return 0;
    conns.delete(&k);
    ctl.delete(&k);
    emit_simple(EV_CLOSE, id, fd, 0, 0);
    return 0;
}

static __always_inline int conn_exit(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 tgid = id >> 32;
    struct conn_args *ap = conn_args.lookup(&tid);
    if (!ap)
        return 0;
    struct conn_args a = *ap;
    conn_args.delete(&tid);

    s32 fd;
    if (a.role == ROLE_CLIENT) {
        if (ret != 0 && ret != -EINPROGRESS_)
            return 0;
        fd = a.fd;
    } else {
        if (ret < 0)
            return 0;
        fd = (s32)ret;
    }
    struct cfg *c = get_cfg();
    if (!c)
        return 0;

    // sockaddr_in / sockaddr_in6 from user memory: family, port, then the address at 4 or 8.
    u8 sa[28] = {};
    u16 family = 0, port = 0;
    if (a.addr) {
        u64 len = a.role == ROLE_CLIENT ? a.addrlen : sizeof(sa);
        if (len > sizeof(sa))
            len = sizeof(sa);
        len &= 31;
        if (len > sizeof(sa))
            return 0;
        if (bpf_probe_read_user(sa, len, (void *)a.addr) != 0)
            return 0;
        family = sa[0] | ((u16)sa[1] << 8);
        if (family != AF_INET_ && family != AF_INET6_)
            return drop_stale(id, fd);  // AF_UNIX, AF_NETLINK, AF_UNSPEC (disconnect), ...
        port = ((u16)sa[2] << 8) | sa[3];
    }
    if (task_filtered(c, tgid)) {
        count(C_FILTERED, 1);
        return drop_stale(id, fd);
    }
    s32 listen_fd = a.role == ROLE_SERVER ? a.fd : -1;
    u16 *bound = 0;
    if (listen_fd >= 0 && (c->flags & CF_PORT_ANY)) {
        struct conn_key lk = {.tgid = tgid, .fd = listen_fd};
        bound = bound_ports.lookup(&lk);
    }
    if (port_filtered(c, port) || (bound && port_filtered(c, *bound))) {
        count(C_FILTERED, 1);
        // Its data must not come back through the unknown-fd path either (until close).
        struct conn_key fk = {.tgid = tgid, .fd = fd};
        u8 done = UNKNOWN_DONE;
        unknown_seen.update(&fk, &done);
        return drop_stale(id, fd);
    }

    struct conn_ev *e = events.ringbuf_reserve(sizeof(struct conn_ev));
    if (!e) {
        count(C_RING_FULL, 1);
        return 0;
    }
    fill_hdr(&e->h, EV_OPEN, id, fd);
    e->h.role = a.role;
    e->family = family;
    e->port = port;
    e->listen_fd = bound ? -1 : listen_fd;  // -1: judged here, nothing for userspace to ask
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    if (family == AF_INET_) {
        __builtin_memcpy(e->addr, &sa[4], 4);
    } else if (family == AF_INET6_) {
        __builtin_memcpy(e->addr, &sa[8], 16);
    }
    u64 cookie = e->h.ts_ns;
    e->cookie = cookie;
    events.ringbuf_submit(e, 0);  // lifecycle events wake the reader at once
    count(C_EVENTS, 1);
    count(C_LIFECYCLE, 1);

    // Insert after the event is reserved, so no data of this connection can precede it.
    struct conn_key k = {.tgid = tgid, .fd = fd};
    struct conn_val v = {};
    v.cookie = cookie;
    v.port = port;
    v.role = a.role;
    v.family = (u8)family;
    if (conns.update(&k, &v) != 0)
        count(C_CONN_TABLE_FULL, 1);
    ctl.delete(&k);
    unknown_seen.delete(&k);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    return conn_enter((s32)args->fd, (u64)args->uservaddr, (u64)args->addrlen, ROLE_CLIENT);
}
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { return conn_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept) {
    return conn_enter((s32)args->fd, (u64)args->upeer_sockaddr, 0, ROLE_SERVER);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return conn_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) {
    return conn_enter((s32)args->fd, (u64)args->upeer_sockaddr, 0, ROLE_SERVER);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return conn_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_bind) {
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || !(c->flags & CF_PORT_ANY) || (id >> 32) == c->self_tgid)
        return 0;
    u8 sa[4] = {};  // family (host order), port (network order)
    if (bpf_probe_read_user(sa, sizeof(sa), (void *)args->umyaddr) != 0)
        return 0;
    u16 family = sa[0] | ((u16)sa[1] << 8);
    if (family != AF_INET_ && family != AF_INET6_)
        return 0;
    struct conn_key k = {.tgid = id >> 32, .fd = (s32)args->fd};
    u16 port = ((u16)sa[2] << 8) | sa[3];
    if (port)
        bound_ports.update(&k, &port);
    else  // an ephemeral port: not known here
        bound_ports.delete(&k);
    return 0;
}

// ---------------------------------------------------------------------------------------
// close and process exit

// The file an fd held goes: close(), or dup2/dup3 putting another file on the fd (they
// close it without close()). Judged at enter, as the call will do it.
static __always_inline int fd_gone(s32 fd) {
    u64 id = bpf_get_current_pid_tgid();
    struct conn_key k = {.tgid = id >> 32, .fd = fd};
    unknown_seen.delete(&k);
    struct cfg *c = get_cfg();
    if (c && (c->flags & CF_PORT_ANY))
        bound_ports.delete(&k);
    if (!conns.lookup(&k))
        return 0;
    conns.delete(&k);
    ctl.delete(&k);
    emit_simple(EV_CLOSE, id, k.fd, 0, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close) { return fd_gone((s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) {
    // dup2(fd, fd) replaces nothing
    return args->oldfd == args->newfd ? 0 : fd_gone((s32)args->newfd);
}
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) {
    return args->oldfd == args->newfd ? 0 : fd_gone((s32)args->newfd);  // (EINVAL)
}

// close_range() closes every fd of a range (Python's subprocess, systemd, before exec).
// The kernel cannot walk `conns` for the range: userspace ends the connections it tracks
// there and deletes their entries (the event's tid field carries the range's last fd).
TRACEPOINT_PROBE(syscalls, sys_enter_close_range) {
    if ((args->flags & CLOSE_RANGE_CLOEXEC_) || args->fd > args->max_fd)
        return 0;  // only marked close-on-exec, or EINVAL
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || (id >> 32) == c->self_tgid)
        return 0;
    struct ev_hdr *h = events.ringbuf_reserve(sizeof(struct ev_hdr));
    if (!h) {
        count(C_RING_FULL, 1);
        return 0;
    }
    fill_hdr(h, EV_CLOSE_RANGE, id, (s32)(args->fd > 0x7fffffff ? 0x7fffffff : args->fd));
    h->tid = args->max_fd > 0x7fffffff ? 0x7fffffff : (u32)args->max_fd;
    events.ringbuf_submit(h, 0);
    count(C_EVENTS, 1);
    count(C_LIFECYCLE, 1);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    tls_args.delete(&tid);
    tls_wait.delete(&tid);
    tls_lastrd.delete(&tid);
#if HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if ((u32)id != (id >> 32))
        return 0;
#endif
    struct cfg *c = get_cfg();
    if (!c || (id >> 32) == c->self_tgid)
        return 0;
    emit_simple(EV_EXIT, id, -1, 0, 0);
    return 0;
}

// A new program image: userspace checks it for an embedded OpenSSL to attach to.
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || (id >> 32) == c->self_tgid)
        return 0;
    emit_simple(EV_EXEC, id, -1, 0, 0);
    return 0;
}

// ---------------------------------------------------------------------------------------
// Data: enter

static __always_inline void unknown_notice(struct cfg *c, struct conn_key *k, u64 id, u8 hint) {
    if (task_filtered(c, k->tgid)) {
        count(C_FILTERED, 1);
        return;
    }
    // Marked done only once the notice is in the ring: a lost notice (the ring full) would
    // leave the connection unobserved for its whole life.
    if (emit_simple(EV_UNKNOWN_FD, id, k->fd, hint, DIR_SEND) == 0) {
        u8 done = UNKNOWN_DONE;
        unknown_seen.update(k, &done);
        count(C_UNKNOWN_FD, 1);
    }
}

// Untracked fd written with HTTP-looking bytes, or written inside an SSL call (a TLS socket:
// its ciphertext never looks like HTTP): one notice per (tgid, fd), so that userspace adopts
// it. Such sockets were opened before the daemon started, or while the ring was full (their
// open event was lost).
static __always_inline void unknown_check(struct cfg *c, struct conn_key *k, u64 id, u64 ptr,
                                          u64 cnt, u8 kind) {
    // Value: failed sniff attempts, or UNKNOWN_DONE once notified (or ignored by userspace).
    // After UNKNOWN_TRIES non-HTTP writes an fd (a log file, /dev/null) costs one lookup.
    u8 *seen = unknown_seen.lookup(k);
    u8 tries = seen ? *seen : 0;
    if (tries >= UNKNOWN_TRIES)
        return;
    if (shedding())
        return;  // a notice would be lost: the next write after the shedding tries again
    // The thread's SSL state: looked up only for an fd's first few writes.
    struct task_st *ts = task_state(0);
    u32 tid = (u32)id;
    if (ts && ((ts->in_ssl && tls_args.lookup(&tid)) || ts->tls_wait)) {
        unknown_notice(c, k, id, HINT_TLS);
        return;
    }
    u64 buf = ptr, len = cnt;
    if (kind == K_MSG) {
        u64 iovp = 0, iovlen = 0;
        if (bpf_probe_read_user(&iovp, 8, (void *)(ptr + MSGHDR_IOV_OFF)) ||
            bpf_probe_read_user(&iovlen, 8, (void *)(ptr + MSGHDR_IOVLEN_OFF)) || !iovlen)
            return;
        buf = iovp;
        kind = K_IOV;
    }
    if (kind == K_IOV) {
        struct u_iovec iov = {};
        if (bpf_probe_read_user(&iov, sizeof(iov), (void *)buf))
            return;
        buf = iov.base;
        len = iov.len;
    } else if (kind != K_BUF) {
        return;
    }
    u8 b[SNIFF_LEN] = {};
    u64 n = len > SNIFF_LEN ? SNIFF_LEN : len;
    n &= (SNIFF_LEN * 2 - 1);
    if (n > SNIFF_LEN)
        return;
    if (bpf_probe_read_user(b, n, (void *)buf))
        return;
    u8 hint = 0;
    if (classify(b, (u32)n, 1, &hint) != SNIFF_HTTP) {
        tries += 1;
        unknown_seen.update(k, &tries);
        return;
    }
    unknown_notice(c, k, id, hint);
}

#if ARGS_FROM_REGS
// x86-64: a syscall's arguments stay in the register frame saved at its entry until it
// returns (the exit tracepoint runs before signal delivery can rewrite the frame): the fd
// in di, the buffer / iovec / msghdr / mmsghdr pointer in si, the count or vector length
// in dx, for every data syscall traced here (sendfile64's out_fd is di too). The frame's
// layout is the user register ABI, and the loads are checked against the running
// kernel's BTF.
static __always_inline void regs_args(struct task_struct *task, struct data_args *a) {
    struct pt_regs *r = (struct pt_regs *)bpf_task_pt_regs(task);
    a->fd = (s32)r->di;
    a->ptr = r->si;
    a->cnt = r->dx;
}
#else
// Enter only remembers the arguments (in the thread's task storage): every decision needs
// the exit's byte count anyway, and one lookup per syscall is the cost on untracked fds.
static __always_inline int data_enter(s32 fd, u64 ptr, u64 cnt, u8 kind, u8 dir) {
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || (id >> 32) == c->self_tgid)
        return 0;
    struct task_st *ts = task_state(1);
    if (!ts) {
        count(C_STASH_FULL, 1);
        return 0;
    }
    ts->a.ptr = ptr;
    ts->a.cnt = cnt;
    ts->a.fd = fd;
    ts->a.kind = kind;
    ts->a.dir = dir;
    ts->pending = 1;
    return 0;
}
#endif

// ---------------------------------------------------------------------------------------
// Data: exit. The cursor walks (message -> iovec -> bytes) in one constant-bounded loop.

// The copy of one syscall's bytes runs as a chain of tail calls into copy_step, each doing
// up to STEP_ITERS steps of a flat cursor (message -> iovec -> bytes). Every verified
// program stays small (the verifier here costs tens of microseconds per instruction), and
// the cursor lives in a per-CPU map value read through a volatile pointer, so the verifier
// sees unknown scalars at each step (clamped before use) and prunes instead of tracking
// every byte count. Tail calls stay on the CPU; the chain cannot be interleaved with
// another program on this CPU (bpf_prog_active).
struct cursor {
    u64 cur;        // user pointer of the current segment
    u64 cur_left;   // bytes left in the current segment
    u64 msg_left;   // bytes left in the current message
    u64 iov_ptr;    // iovec array of the current message
    u64 iov_n;
    u64 iov_i;
    u64 msg_ptr;    // mmsghdr array
    u64 msg_n;
    u64 msg_i;
    u64 remaining;  // bytes of the syscall not walked yet
    u64 skip_left;
    u64 cap_left;   // bytes still to copy
    u64 copied;     // bytes copied and delivered
    u64 len;
    u64 total;
    u64 skip;
    u64 fill;       // bytes packed in the scratch record, not yet emitted (< CHUNK_SIZE)
    u32 calls;
    u8 kind;
    u8 stop;        // 1: stopped early (bound, fault), 2: ring full
    u8 last_sent;
    u8 pad;
};
BPF_PERCPU_ARRAY(cursors, struct cursor, 1);
BPF_PROG_ARRAY(copy_jmp, 1);

#define STEP_ITERS 8
#define MAX_CALLS 30

static __always_inline u64 mmsg_total(u64 ptr, long nmsg) {
    u64 total = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < MAX_MMSG_SUM; i++) {
        if (i >= nmsg)
            break;
        u32 l = 0;
        bpf_probe_read_user(&l, sizeof(l), (void *)(ptr + (u64)i * MMSGHDR_SIZE + MMSGHDR_LEN_OFF));
        total += l;
    }
    return total;
}

// The user pointer and length of the first segment of the syscall's bytes.
static __always_inline void first_segment(struct data_args *a, u64 total, u64 *ptr, u64 *len) {
    u64 iovp = a->ptr;
    *ptr = 0;
    *len = 0;
    if (a->kind == K_BUF) {
        *ptr = a->ptr;
        *len = total;
        return;
    }
    if (a->kind == K_MSG || a->kind == K_MMSG) {
        if (bpf_probe_read_user(&iovp, 8, (void *)(a->ptr + MSGHDR_IOV_OFF)))
            return;
    } else if (a->kind != K_IOV) {
        return;
    }
    struct u_iovec iov = {};
    if (bpf_probe_read_user(&iov, sizeof(iov), (void *)iovp))
        return;
    *ptr = iov.base;
    *len = iov.len < total ? iov.len : total;
}

// Protocol gate for a direction whose sniff is not decided yet. Returns 1 when the syscall
// must not be reported. Runs once per syscall, before the copy loop (inside the loop its
// branches multiply the verifier's states).
static __always_inline int sniff_gate(struct data_args *a, struct dir_state *ds, u64 offset,
                                      u64 skip, u64 total) {
    u8 st0 = ds->sniff;
    if (st0 != SNIFF_PENDING && st0 != SNIFF_RESYNC)
        return 0;
    if (skip)
        return 0;  // userspace asked to skip: it knows what this stream is
    u64 ptr = 0, seg = 0;
    first_segment(a, total, &ptr, &seg);
    u8 b[SNIFF_LEN] = {};
    u64 n = seg > SNIFF_LEN ? SNIFF_LEN : seg;
    BARRIER_VAR(n);
    if (n > SNIFF_LEN)
        n = SNIFF_LEN;
    if (n && bpf_probe_read_user(b, n, (void *)ptr))
        n = 0;
    u8 hint = 0;
    int st;
    if (st0 == SNIFF_PENDING && offset == ds->sniff_len && ds->sniff_len < SNIFF_LEN) {
        // Still at the start of the direction: accumulate (1-byte writes).
        u32 sl = ds->sniff_len;
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < SNIFF_LEN; i++) {
            u32 j = sl + i;
            if (i >= n || j >= SNIFF_LEN)
                break;
            BARRIER_VAR(j);  // keep the mask: the verifier needs it, clang would drop it
            j &= SNIFF_LEN - 1;
            ds->sniff_buf[j] = b[i & (SNIFF_LEN - 1)];
            ds->sniff_len = j + 1;
        }
        st = classify(ds->sniff_buf, ds->sniff_len, 0, &hint);
    } else {
        // Adopted mid-stream, or the start was not seen contiguously: judge this syscall
        // alone and drop it unless it starts like HTTP.
        st = classify(b, (u32)n, 1, &hint);
        if (st != SNIFF_HTTP) {
            count(C_SNIFF_REJECTED, 1);
            return 1;
        }
    }
    if (st == SNIFF_REJECTED) {
        ds->sniff = SNIFF_REJECTED;
        count(C_SNIFF_REJECTED, 1);
        return 1;
    }
    if (st == SNIFF_HTTP)
        ds->sniff = SNIFF_HTTP;
    return 0;
}

// Emit the record packed so far (s->fill bytes at ev->data): segments of one syscall (the
// iovecs of a writev, the messages of a sendmmsg) share records, CHUNK_SIZE bytes at most
// each. Returns 1 when the ring is full (the record is lost, counted).
static __always_inline int emit_fill(volatile struct cursor *s, struct data_ev *ev, int last) {
    u64 fill = s->fill;
    u64 copied = s->copied;
    fill &= 2 * CHUNK_SIZE - 1;  // a no-op (fill <= CHUNK_SIZE): bounds the output size
    ev->chunk_off = (u32)copied;
    ev->chunk_len = (u32)fill;
    ev->h.flags = (copied == 0 ? DF_FIRST : 0) | (last ? DF_LAST : 0);
    s->fill = 0;
    if (events.ringbuf_output(ev, offsetof(struct data_ev, data) + fill, rb_flags()) != 0) {
        ring_was_full();
        return 1;
    }
    count(C_EVENTS, 1);
    count(C_BYTES, fill);
    s->copied = copied + fill;
    s->last_sent = last;
    return 0;
}

static __always_inline void copy_finish(volatile struct cursor *s, struct data_ev *ev) {
    if (!s->last_sent && s->stop != 2) {
        if (s->fill) {
            // Stopped before the cap with bytes packed (segments ran out, a fault, the
            // tail-call bound): they close the syscall.
            emit_fill(s, ev, 1);
        } else {
            // Nothing copied, or stopped early: a header-only record closes the syscall.
            u64 copied = s->copied;
            ev->chunk_off = (u32)copied;
            ev->chunk_len = 0;
            ev->h.flags = (copied == 0 ? DF_FIRST : 0) | DF_LAST | (ev->h.flags & DF_NODATA);
            if (events.ringbuf_output(ev, offsetof(struct data_ev, data), rb_flags()) != 0)
                ring_was_full();
            else
                count(C_EVENTS, 1);
        }
    }
    u64 copied = s->copied;
    u64 skip = s->skip;
    if (skip)
        count(C_SKIPPED_BYTES, skip);
    u64 missed = s->total - skip - copied;
    if (missed) {
        count(C_TRUNCATED_BYTES, missed);
        count(C_TRUNCATED_SYSCALLS, 1);
    }
}

// One step of the copy chain: up to STEP_ITERS cursor moves.
static __always_inline void copy_loop(struct data_ev *ev, volatile struct cursor *s) {
    u8 kind = s->kind;
#pragma clang loop unroll(disable)
    for (int i = 0; i < STEP_ITERS; i++) {
        if (s->remaining == 0 || (s->skip_left == 0 && s->cap_left == 0)) {
            s->stop = s->stop ? s->stop : 3;  // done
            break;
        }
        if (s->cur_left == 0) {
            u64 iov_i = s->iov_i;
            if (kind != K_BUF && iov_i < s->iov_n && s->msg_left > 0) {
                if (iov_i >= MAX_IOV) {
                    s->stop = 1;
                    break;
                }
                struct u_iovec iov = {};
                if (bpf_probe_read_user(&iov, sizeof(iov),
                                        (void *)(s->iov_ptr + iov_i * sizeof(iov)))) {
                    s->stop = 1;
                    break;
                }
                s->iov_i = iov_i + 1;
                s->cur = iov.base;
                u64 ml = s->msg_left;
                s->cur_left = iov.len < ml ? iov.len : ml;
                continue;
            }
            u64 msg_i = s->msg_i;
            if (kind == K_MMSG && msg_i < s->msg_n && msg_i < MAX_MMSG) {
                u64 base = s->msg_ptr + msg_i * MMSGHDR_SIZE;
                u64 iovp = 0, iovn = 0;
                u32 l = 0;
                if (bpf_probe_read_user(&iovp, 8, (void *)(base + MSGHDR_IOV_OFF)) ||
                    bpf_probe_read_user(&iovn, 8, (void *)(base + MSGHDR_IOVLEN_OFF)) ||
                    bpf_probe_read_user(&l, 4, (void *)(base + MMSGHDR_LEN_OFF))) {
                    s->stop = 1;
                    break;
                }
                s->iov_ptr = iovp;
                s->iov_n = iovn;
                s->msg_i = msg_i + 1;
                s->iov_i = 0;
                s->msg_left = l;
                continue;
            }
            s->stop = 1;
            break;
        }
        u64 n = s->cur_left;
        u64 rem = s->remaining;
        if (n > rem)
            n = rem;
        u64 sk = s->skip_left;
        if (sk) {
            if (n > sk)
                n = sk;
            s->skip_left = sk - n;
        } else {
            u64 cl = s->cap_left;
            if (n > cl)
                n = cl;
            u64 off = s->fill & (CHUNK_SIZE - 1);  // a no-op: fill < CHUNK_SIZE here
            if (n > CHUNK_SIZE - off)
                n = CHUNK_SIZE - off;
            // Through the map and back masked and bounded (no-ops: n <= CHUNK_SIZE - off):
            // one verifier state for the length instead of one per path through the
            // min() chain, and off + len within the 2 * CHUNK_SIZE buffer.
            s->len = n;
            u64 len = s->len;
            len &= 2 * CHUNK_SIZE - 1;
            if (len > CHUNK_SIZE) {
                s->stop = 1;
                break;
            }
            if (bpf_probe_read_user(ev->data + off, len, (void *)s->cur) != 0) {
                s->stop = 1;
                break;
            }
            s->cap_left = cl - len;
            s->fill = off + len;
            int last = len >= cl;
            if ((last || off + len >= CHUNK_SIZE) && emit_fill(s, ev, last)) {
                s->stop = 2;
                break;
            }
            n = len;
        }
        s->cur += n;
        s->cur_left -= n;
        s->msg_left -= n;
        s->remaining = rem - n;
    }
}

int copy_step(void *ctx) {
    u32 zero = 0;
    struct data_ev *ev = scratch.lookup(&zero);
    volatile struct cursor *s = cursors.lookup(&zero);
    if (!ev || !s)
        return 0;
    copy_loop(ev, s);
    if (s->stop == 0 && s->calls < MAX_CALLS) {
        s->calls += 1;
        copy_jmp.call(ctx, 0);
        // the tail call failed (chain limit): what is left is a gap
    }
    copy_finish(s, ev);
    return 0;
}

// The same chain for the uprobe programs (a tail call keeps the program type, and the TLS
// path has its own per-CPU scratch and cursor so that it never shares them with a
// syscall's copy).
BPF_PERCPU_ARRAY(tls_cursors, struct cursor, 1);
BPF_PROG_ARRAY(tls_jmp, 1);

int copy_step_tls(struct pt_regs *ctx) {
    u32 zero = 0;
    struct data_ev *ev = tls_scratch.lookup(&zero);
    volatile struct cursor *s = tls_cursors.lookup(&zero);
    if (!ev || !s)
        return 0;
    copy_loop(ev, s);
    if (s->stop == 0 && s->calls < MAX_CALLS) {
        s->calls += 1;
        tls_jmp.call(ctx, 0);
    }
    copy_finish(s, ev);
    return 0;
}

// `kind` and `dir` are compile-time constants per program: dead paths vanish.
static __always_inline int data_exit(void *ctx, long ret, const u8 kind, const u8 dir) {
#if ARGS_FROM_REGS
    if (ret <= 0)
        return 0;  // EAGAIN, EOF, errors: the cheapest way out comes first
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || (id >> 32) == c->self_tgid)
        return 0;
    // One helper call for the task (each costs ~20 ns here): its registers, and its
    // storage below.
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct data_args a = {};
    regs_args(task, &a);
#else
    u64 id = bpf_get_current_pid_tgid();
    struct task_st *ts = task_state(0);
    if (!ts || !ts->pending)
        return 0;
    ts->pending = 0;
    struct data_args a = ts->a;
    if (ret <= 0)
        return 0;
    struct cfg *c = get_cfg();
    if (!c)
        return 0;
#endif
    a.kind = kind;
    a.dir = dir;
    struct conn_key k = {.tgid = id >> 32, .fd = a.fd};
    struct conn_val *cv = conns.lookup(&k);
    if (!cv) {
        // Not tracked (or closed meanwhile by another thread): an inet socket the kernel
        // never saw open gets one notice when it writes HTTP.
        if (a.dir == DIR_SEND && kind != K_NONE)
            unknown_check(c, &k, id, a.ptr, a.cnt, kind);
        return 0;
    }
    struct dir_state *ds = a.dir == DIR_SEND ? &cv->d[0] : &cv->d[1];
    // The ring is full on this CPU: under overload each syscall costs as little as it
    // can. The SSL bookkeeping waits (an SSL object is bound to its socket at the next
    // syscall it makes inside SSL_read/SSL_write once the shedding is over); a direction
    // already known to carry ciphertext is counted as such, as below.
    int shed = shedding();
#if ARGS_FROM_REGS
    // Set by the SSL uprobes; looked up for tracked sockets only, and not while shedding.
    struct task_st *ts = shed ? NULL : task_state_of(task, 0);
#endif
    if (shed ? ds->sniff == SNIFF_TLS : tls_note(id, a.fd, cv, a.dir, ts)) {
        count(C_TLS_CIPHERTEXT, 1);
        return 0;
    }
    if (task_filtered(c, k.tgid) || port_filtered(c, cv->port)) {
        count(C_FILTERED, 1);
        return 0;
    }
    if (ds->sniff == SNIFF_REJECTED) {
        count(C_SNIFF_REJECTED, 1);
        return 0;
    }

    u64 total = (u64)ret;
    u64 iov_ptr = 0, iov_n = 0, cur = 0, cur_left = 0, msg_left = 0;
    if (kind == K_MMSG) {
        total = mmsg_total(a.ptr, ret);
    } else if (kind == K_MSG) {
        if (shed || bpf_probe_read_user(&iov_ptr, 8, (void *)(a.ptr + MSGHDR_IOV_OFF)) ||
            bpf_probe_read_user(&iov_n, 8, (void *)(a.ptr + MSGHDR_IOVLEN_OFF)))
            iov_n = 0;
        msg_left = total;
    } else if (kind == K_IOV) {
        iov_ptr = a.ptr;
        iov_n = a.cnt;
        msg_left = total;
    } else if (kind == K_BUF) {
        cur = a.ptr;
        cur_left = total;
        msg_left = total;
    }

    u64 offset = ds->offset;
    ds->offset = offset + total;
    if (shed) {
        // Before the control lookup and the sniff. Its bytes become a gap at the reader.
        count(C_RING_FULL, 1);
        return 0;
    }
    struct ctl_val *cl = ctl.lookup(&k);
    if (cl && cl->cookie == cv->cookie) {
        if (cl->flags & CTL_IGNORE) {
            count(C_IGNORED, 1);
            return 0;
        }
        a.skip_until = a.dir == DIR_SEND ? cl->skip_until[0] : cl->skip_until[1];
    } else {
        a.skip_until = 0;
    }
    u64 skip = 0;
    if (a.skip_until > offset)
        skip = a.skip_until - offset;
    if (skip > total)
        skip = total;
    if (sniff_gate(&a, ds, offset, skip, total))
        return 0;  // not HTTP: nothing reported, nothing counted as truncated
    u64 cap = c->cap;
    if (cap > MAX_CAP)
        cap = MAX_CAP;
    if (cap > total - skip)
        cap = total - skip;
    u32 zero = 0;
    struct data_ev *ev = scratch.lookup(&zero);
    volatile struct cursor *s = cursors.lookup(&zero);
    if (!ev || !s)
        return 0;
    fill_hdr(&ev->h, EV_DATA, id, a.fd);
    ev->h.dir = a.dir;
    ev->h.role = cv->role;
    ev->h.flags = kind == K_NONE ? DF_NODATA : 0;
    ev->total_len = total;
    ev->offset = offset;
    ev->skipped = skip;
    ev->chunk_off = 0;
    ev->chunk_len = 0;
    ev->tls_id = 0;

    s->cur = cur;
    s->cur_left = cur_left;
    s->msg_left = msg_left;
    s->iov_ptr = iov_ptr;
    s->iov_n = iov_n;
    s->iov_i = 0;
    s->msg_ptr = a.ptr;
    s->msg_n = kind == K_MMSG ? (u64)ret : 0;
    s->msg_i = 0;
    s->remaining = kind == K_NONE ? 0 : total;
    s->skip_left = skip;
    s->cap_left = cap;
    s->copied = 0;
    s->len = 0;
    s->total = total;
    s->skip = skip;
    s->calls = 0;
    s->kind = kind;
    s->stop = 0;
    s->last_sent = 0;
    s->fill = 0;
    copy_jmp.call(ctx, 0);
    // copy_step not installed (only while loading): report the syscall as a gap
    s->stop = 1;
    copy_finish(s, ev);
    return 0;
}

// The enter programs exist only where the exit cannot read the arguments itself.
#if !ARGS_FROM_REGS
TRACEPOINT_PROBE(syscalls, sys_enter_write) {
    return data_enter((s32)args->fd, (u64)args->buf, args->count, K_BUF, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_enter_writev) {
    return data_enter((s32)args->fd, (u64)args->vec, args->vlen, K_IOV, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) {
    return data_enter((s32)args->fd, (u64)args->buff, args->len, K_BUF, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    return data_enter((s32)args->fd, (u64)args->msg, 0, K_MSG, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) {
    return data_enter((s32)args->fd, (u64)args->mmsg, args->vlen, K_MMSG, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) {
    return data_enter((s32)args->out_fd, 0, args->count, K_NONE, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_enter_read) {
    return data_enter((s32)args->fd, (u64)args->buf, args->count, K_BUF, DIR_RECV);
}
TRACEPOINT_PROBE(syscalls, sys_enter_readv) {
    return data_enter((s32)args->fd, (u64)args->vec, args->vlen, K_IOV, DIR_RECV);
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) {
    return data_enter((s32)args->fd, (u64)args->ubuf, args->size, K_BUF, DIR_RECV);
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) {
    return data_enter((s32)args->fd, (u64)args->msg, 0, K_MSG, DIR_RECV);
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg) {
    return data_enter((s32)args->fd, (u64)args->mmsg, args->vlen, K_MMSG, DIR_RECV);
}
#endif

TRACEPOINT_PROBE(syscalls, sys_exit_write) { return data_exit(args, args->ret, K_BUF, DIR_SEND); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return data_exit(args, args->ret, K_IOV, DIR_SEND); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return data_exit(args, args->ret, K_BUF, DIR_SEND); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return data_exit(args, args->ret, K_MSG, DIR_SEND); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) {
    return data_exit(args, args->ret, K_MMSG, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) {
    return data_exit(args, args->ret, K_NONE, DIR_SEND);
}
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return data_exit(args, args->ret, K_BUF, DIR_RECV); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return data_exit(args, args->ret, K_IOV, DIR_RECV); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) {
    return data_exit(args, args->ret, K_BUF, DIR_RECV);
}
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return data_exit(args, args->ret, K_MSG, DIR_RECV); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) {
    return data_exit(args, args->ret, K_MMSG, DIR_RECV);
}

// ---------------------------------------------------------------------------------------
// TLS: OpenSSL uprobes (attached by userspace to every libssl and every binary that
// exports SSL_* itself)

static __always_inline int ssl_enter(struct pt_regs *ctx, u8 dir, u8 is_ex) {
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || (c->flags & CF_TLS_OFF) || task_filtered(c, id >> 32))
        return 0;
    struct tls_args a = {};
    a.ssl = PT_REGS_PARM1(ctx);
    a.buf = PT_REGS_PARM2(ctx);
    a.exptr = is_ex ? PT_REGS_PARM4(ctx) : 0;
    a.fd = -1;
    a.dir = dir;
    a.is_ex = is_ex;
    u32 tid = (u32)id;
    struct task_st *ts = task_state(1);
    if (!ts || tls_args.update(&tid, &a) != 0) {
        count(C_STASH_FULL, 1);
        return 0;
    }
    ts->in_ssl = 1;
    return 0;
}

static __always_inline int ssl_exit(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct tls_args *ap = tls_args.lookup(&tid);
    if (!ap)
        return 0;
    struct tls_args a = *ap;
    tls_args.delete(&tid);
    struct task_st *ts = task_state(0);
    if (ts)
        ts->in_ssl = 0;
    long ret = PT_REGS_RC(ctx);
    u64 total = 0;
    if (a.is_ex) {
        // SSL_read_ex/SSL_write_ex: 1 on success, the byte count in the out-parameter
        if ((int)ret != 1 || !a.exptr || bpf_probe_read_user(&total, 8, (void *)a.exptr))
            return 0;
    } else {
        if ((int)ret <= 0)  // retries before the handshake ends, WANT_READ, errors
            return 0;
        total = (u64)(int)ret;
    }
    if (total == 0)
        return 0;
    struct cfg *c = get_cfg();
    u32 zero = 0;
    struct data_ev *ev = tls_scratch.lookup(&zero);
    volatile struct cursor *s = tls_cursors.lookup(&zero);
    if (!c || !ev || !s)
        return 0;
    u32 tgid = id >> 32;
    u8 dir = a.dir == DIR_SEND ? DIR_SEND : DIR_RECV;
    struct ssl_key sk = {.tgid = tgid, .pad = 0, .ssl = a.ssl};
    struct ssl_val *sv = ssl_state.lookup(&sk);
    if (!sv) {
        struct ssl_val v = {};
        v.fd = -1;
        ssl_state.update(&sk, &v);
        sv = ssl_state.lookup(&sk);
        if (!sv)
            return 0;
    }
    struct conn_val *cv = NULL;
    struct conn_key k = {.tgid = tgid, .fd = sv->fd};
    if (sv->fd >= 0) {
        cv = conns.lookup(&k);
        if (!cv || cv->cookie != sv->cookie) {
            sv->fd = -1;  // that connection is gone: this SSL object was reused
            cv = NULL;
        }
    }
    if (sv->fd < 0) {
        if (dir == DIR_RECV) {
            s32 *lr = tls_lastrd.lookup(&tid);
            if (lr) {
                k.fd = *lr;
                cv = conns.lookup(&k);
                if (cv)
                    tls_bind(id, a.ssl, k.fd, cv->cookie);
            }
        } else {
            tls_wait.update(&tid, &a.ssl);
            if (ts)
                ts->tls_wait = 1;
        }
    }
    s32 fd = sv->fd;
    u64 skip_until = 0;
    u8 role = 0;
    if (fd >= 0) {
        k.fd = fd;
        if (cv) {
            if (port_filtered(c, cv->port)) {
                count(C_FILTERED, 1);
                return 0;
            }
            mark_tls(cv);
            role = cv->role;
            struct ctl_val *cl = ctl.lookup(&k);
            if (cl && cl->cookie == cv->cookie) {
                if (cl->flags & CTL_IGNORE) {
                    count(C_IGNORED, 1);
                    return 0;
                }
                skip_until = dir == DIR_SEND ? cl->tls_skip_until[0] : cl->tls_skip_until[1];
            }
        }
    } else {
        count(C_TLS_UNBOUND, 1);
    }
    u64 offset = dir == DIR_SEND ? sv->offset[0] : sv->offset[1];
    if (dir == DIR_SEND)
        sv->offset[0] = offset + total;
    else
        sv->offset[1] = offset + total;
    count(C_TLS_CALLS, 1);
    u64 skip = 0;
    if (skip_until > offset)
        skip = skip_until - offset;
    if (skip > total)
        skip = total;
    u64 cap = c->cap;
    if (cap > MAX_CAP)
        cap = MAX_CAP;
    if (cap > total - skip)
        cap = total - skip;
    if (shedding()) {
        count(C_RING_FULL, 1);
        return 0;
    }

    fill_hdr(&ev->h, EV_DATA, id, fd);
    ev->h.dir = dir;
    ev->h.role = role;
    ev->h.flags = 0;
    ev->total_len = total;
    ev->offset = offset;
    ev->skipped = skip;
    ev->chunk_off = 0;
    ev->chunk_len = 0;
    ev->tls_id = a.ssl;

    s->cur = a.buf;
    s->cur_left = total;
    s->msg_left = total;
    s->iov_ptr = 0;
    s->iov_n = 0;
    s->iov_i = 0;
    s->msg_ptr = 0;
    s->msg_n = 0;
    s->msg_i = 0;
    s->remaining = total;
    s->skip_left = skip;
    s->cap_left = cap;
    s->copied = 0;
    s->len = 0;
    s->total = total;
    s->skip = skip;
    s->calls = 0;
    s->kind = K_BUF;
    s->stop = 0;
    s->last_sent = 0;
    s->fill = 0;
    tls_jmp.call(ctx, 0);
    s->stop = 1;
    copy_finish(s, ev);
    return 0;
}

int ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_SEND, 0); }
int ssl_write_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_SEND, 1); }
int ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_RECV, 0); }
int ssl_read_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_RECV, 1); }
int ssl_return(struct pt_regs *ctx) { return ssl_exit(ctx); }

// SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, name): the SNI a
// client is about to send (SSL_set_tlsext_host_name is a macro over it).
int ssl_ctrl_enter(struct pt_regs *ctx) {
    if ((int)PT_REGS_PARM2(ctx) != SSL_CTRL_SET_TLSEXT_HOSTNAME)
        return 0;
    u64 name = PT_REGS_PARM4(ctx);
    if (!name)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct cfg *c = get_cfg();
    if (!c || (c->flags & CF_TLS_OFF) || task_filtered(c, id >> 32))
        return 0;
    u64 ssl = PT_REGS_PARM1(ctx);
    struct ssl_key sk = {.tgid = id >> 32, .pad = 0, .ssl = ssl};
    struct ssl_val *sv = ssl_state.lookup(&sk);
    if (sv)
        sv->fd = -1;  // a name is set before a handshake: a new session, bind it anew
    tls_emit(EV_TLS_SNI, id, -1, ssl, name);
    return 0;
}
