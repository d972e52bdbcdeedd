/*
 * openloop: the open-loop load generator of bench/sasl_bench.py (scenario hot@20k) for the
 * Dovecot auth protocol. It is C, as wrk is for the HTTP benchmark, so that the generator's own
 * scheduling does not end up in the latencies it measures.
 *
 *     cc -O2 -Wall -Wextra -o openloop openloop.c
 *     openloop HOST PORT CONNECTIONS RATE GO WARMUP DURATION DRAIN TAILS
 *
 *   HOST PORT    the server's auth socket (TCP)
 *   CONNECTIONS  how many connections the requests are spread over
 *   RATE         requests per second, in total
 *   GO           when request 0 is due: an absolute CLOCK_MONOTONIC time in seconds (Python's
 *                time.monotonic() on Linux), so that the caller knows the window; 0: as soon
 *                as connected
 *   WARMUP       seconds of load before the measured window
 *   DURATION     seconds of the measured window [GO+WARMUP, GO+WARMUP+DURATION); sending stops
 *                at its end
 *   DRAIN        seconds to wait after the window for the replies still outstanding
 *   TAILS        a file of request tails, one a line: all of an AUTH line after its id, from the
 *                TAB before the mechanism to the newline, which ends the request
 *
 * Request k (0, 1, 2, ...) is due at GO + k/RATE whatever the replies do; it goes to connection
 * k % CONNECTIONS with that connection's next id (1, 2, 3, ...) and tail k % (number of tails).
 * Its latency runs from that due time to its reply, not from its actual send, so that a late
 * send counts against the latency instead of hiding it (no coordinated omission); how late the
 * sends were is reported as the lag. Both are recorded for the requests due inside the window.
 *
 * Prints one JSON object: the counts sent (requests due in the window, sent), window (OK replies
 * received in the window: the achieved rate), failed (FAIL, or an OAUTHBEARER error challenge:
 * counted once), lost (no reply: connection closed, or none within DRAIN; or never sent, its
 * connection closed) and unmatched (a reply to no outstanding id); p50, p90, p99, max of the
 * latency and lag_p50, lag_p99, lag_max, in seconds (null if none); cpu, this process's CPU
 * seconds over the window; samples, up to 5 error replies; requests, how many were due in all.
 * Exits 1 with a message on stderr if a connection or its handshake fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define INBUF 65536  /* the longest reply line (and handshake) accepted */
#define MAX_SAMPLES 5
#define SLOTS (1 << 18)  /* outstanding requests a connection can have (calloc: pages used as needed) */

struct slot {        /* an outstanding request */
    uint64_t id;     /* 0: a free slot */
    double due;
    int acked;       /* its error challenge has been acknowledged */
};

struct conn {
    int fd;          /* -1 once closed */
    uint64_t next_id;
    struct slot *slots;  /* indexed by id % SLOTS: sequential ids collide only if SLOTS are outstanding */
    size_t outstanding;  /* requests waiting for their reply */
    char *out;       /* what the socket has not taken yet: out[out_start, out_len) */
    size_t out_start, out_len, out_cap;
    char in[INBUF];  /* the start of a reply line not complete yet */
    size_t in_len;
};

struct values { double *v; size_t n, cap; };
struct tails { char **line; size_t *len, n; };

static double t_start, t_end;  /* the measured window */
static unsigned long n_sent, n_window, n_failed, n_lost, n_unmatched;
static struct values latencies, lags;
static struct { char *text; size_t len; } samples[MAX_SAMPLES];
static int n_samples;

static void die(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    fputs("openloop: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(1);
}

static void *resize(void *p, size_t size)
{
    if (!(p = realloc(p, size)))
        die("out of memory");
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static void push(struct values *values, double v)
{
    if (values->n == values->cap) {
        values->cap = values->cap ? 2 * values->cap : 65536;
        values->v = resize(values->v, values->cap * sizeof *values->v);
    }
    values->v[values->n++] = v;
}

static void sample(const char *text, size_t len)
{
    if (n_samples < MAX_SAMPLES) {
        samples[n_samples].text = memcpy(resize(NULL, len + 1), text, len);
        samples[n_samples++].len = len;
    }
}

/* -- a connection: its outstanding requests, its output buffer --------------------------------- */

static void track(struct conn *c, uint64_t id, double due)
{
    struct slot *s = &c->slots[id % SLOTS];
    if (s->id)
        die("more than %d requests outstanding on a connection", SLOTS);
    *s = (struct slot){.id = id, .due = due};
    c->outstanding++;
}

/* failed_call: the call that failed, for a sample with errno; NULL: closed by the server. */
static void close_conn(struct conn *c, const char *failed_call)
{
    if (failed_call) {
        char text[160];
        int len = snprintf(text, sizeof text, "%s: %s", failed_call, strerror(errno));
        sample(text, len < (int)sizeof text ? (size_t)len : sizeof text - 1);
    }
    n_lost += c->outstanding;
    c->outstanding = 0;
    close(c->fd);
    c->fd = -1;
    c->out_start = c->out_len = 0;
}

static void append(struct conn *c, const char *data, size_t len)
{
    if (c->out_len + len > c->out_cap) {
        memmove(c->out, c->out + c->out_start, c->out_len - c->out_start);
        c->out_len -= c->out_start;
        c->out_start = 0;
        while (c->out_len + len > c->out_cap)
            c->out_cap = c->out_cap ? 2 * c->out_cap : 4096;
        c->out = resize(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

/* Send what the socket takes now; the rest waits for POLLOUT. */
static void flush(struct conn *c)
{
    while (c->out_start < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_start, c->out_len - c->out_start, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                close_conn(c, "send");
            return;
        }
        c->out_start += n;
    }
    c->out_start = c->out_len = 0;
}

/* -- replies ------------------------------------------------------------------------------------ */

/* The id of a reply `KIND\tID[\t...]`; 0 (never an id) if it has none. */
static uint64_t reply_id(const char *line, size_t len)
{
    const char *p = memchr(line, '\t', len), *end = line + len;
    uint64_t id = 0;
    if (!p)
        return 0;
    for (p++; p < end && *p != '\t'; p++) {
        if (*p < '0' || *p > '9' || id > UINT64_MAX / 10 - 1)
            return 0;
        id = 10 * id + (uint64_t)(*p - '0');
    }
    return id;
}

static void handle_reply(struct conn *c, const char *line, size_t len, double now)
{
    uint64_t id = reply_id(line, len);
    struct slot *s = &c->slots[id % SLOTS];
    if (!id || s->id != id) {
        n_unmatched++;
        return;
    }
    if (!strncmp(line, "OK\t", 3)) {
        if (now >= t_start && now < t_end)
            n_window++;
        if (s->due >= t_start && s->due < t_end)
            push(&latencies, now - s->due);
    } else if (!strncmp(line, "CONT\t", 5) && !s->acked) {
        /* An OAUTHBEARER error challenge: acknowledge it (RFC 7628 §3.2.3) so that the server
           ends the request with a FAIL, which is then the one error counted. */
        char ack[48];
        s->acked = 1;
        append(c, ack, snprintf(ack, sizeof ack, "CONT\t%" PRIu64 "\tAQ==\n", id));
        sample(line, len);
        return;
    } else {
        n_failed++;
        sample(line, len);
    }
    s->id = 0;
    c->outstanding--;
}

static void read_replies(struct conn *c)
{
    ssize_t n = recv(c->fd, c->in + c->in_len, INBUF - c->in_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        close_conn(c, n < 0 ? "recv" : NULL);
        return;
    }
    double now = now_s();
    char *line = c->in, *end = c->in + c->in_len + n, *newline;
    while ((newline = memchr(line, '\n', end - line))) {
        handle_reply(c, line, newline - line, now);
        line = newline + 1;
    }
    if ((c->in_len = end - line) == INBUF)
        die("a reply line longer than %d bytes", INBUF);
    memmove(c->in, line, c->in_len);
    flush(c);  /* the acknowledgements of error challenges */
}

/* -- setting up --------------------------------------------------------------------------------- */

static void connect_conn(struct conn *c, const struct addrinfo *ai)
{
    static const int one = 1;
    struct timeval timeout = {.tv_sec = 10};
    char hello[64], *done;
    if ((c->fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol)) < 0 ||
        connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0)
        die("connect: %s", strerror(errno));
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    /* The server speaks first: VERSION, MECH..., SPID, CUID, COOKIE, then DONE. */
    while (!(done = memmem(c->in, c->in_len, "\nDONE\n", 6))) {
        if (c->in_len == INBUF)
            die("handshake: no DONE line in the first %d bytes", INBUF);
        ssize_t n = recv(c->fd, c->in + c->in_len, INBUF - c->in_len, 0);
        if (n <= 0)
            die("handshake: %s", n < 0 ? strerror(errno) : "connection closed by the server");
        c->in_len += n;
    }
    c->in_len -= done + 6 - c->in;
    memmove(c->in, done + 6, c->in_len);
    int len = snprintf(hello, sizeof hello, "VERSION\t1\t2\nCPID\t%d\n", (int)getpid());
    if (send(c->fd, hello, len, MSG_NOSIGNAL) != len)
        die("handshake: send: %s", strerror(errno));
    if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0)
        die("fcntl: %s", strerror(errno));
    c->next_id = 1;
    if (!(c->slots = calloc(SLOTS, sizeof *c->slots)))
        die("out of memory");
}

static struct tails read_tails(const char *path)
{
    struct tails t = {0};
    FILE *f = fopen(path, "rb");
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    if (!f)
        die("%s: %s", path, strerror(errno));
    while ((len = getline(&line, &cap, f)) > 0) {
        if (line[len - 1] != '\n')
            die("%s: the last line has no newline", path);
        t.line = resize(t.line, (t.n + 1) * sizeof *t.line);
        t.len = resize(t.len, (t.n + 1) * sizeof *t.len);
        t.line[t.n] = memcpy(resize(NULL, len), line, len);
        t.len[t.n++] = len;
    }
    free(line);
    fclose(f);
    if (!t.n)
        die("%s: no request tails", path);
    return t;
}

/* -- the open loop ------------------------------------------------------------------------------ */

struct schedule {
    double go, rate;
    uint64_t k;      /* the next request */
    struct tails tails;
};

static double due(const struct schedule *s)
{
    return s->go + s->k / s->rate;
}

/* Queue every request due by now (up to the end of the window), then hand each connection's
   batch to its socket in one send(). The lag is taken from `now`, just before those sends. */
static void send_due(struct schedule *s, struct conn *conns, int n_conns, double now)
{
    for (double d; (d = due(s)) <= now && d < t_end; s->k++) {
        struct conn *c = &conns[s->k % n_conns];
        size_t tail = s->k % s->tails.n;
        char head[32];
        if (c->fd < 0) {  /* closed by the server: a request that could not be sent is lost */
            n_lost++;
            continue;
        }
        uint64_t id = c->next_id++;
        track(c, id, d);
        append(c, head, snprintf(head, sizeof head, "AUTH\t%" PRIu64, id));
        append(c, s->tails.line[tail], s->tails.len[tail]);
        if (d >= t_start) {
            n_sent++;
            push(&lags, now - d);
        }
    }
    for (int i = 0; i < n_conns; i++)
        if (conns[i].out_len)
            flush(&conns[i]);
}

/* -- the result --------------------------------------------------------------------------------- */

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* As sasl_bench.percentile(): of the sorted values, the one at min(n - 1, int(fraction * n)). */
static double percentile(const struct values *sorted, double fraction)
{
    size_t i = (size_t)(fraction * sorted->n);
    return !sorted->n ? NAN : sorted->v[i < sorted->n ? i : sorted->n - 1];
}

/* The length of the valid UTF-8 sequence at s (n bytes left), 0 if there is none. */
static size_t utf8_length(const unsigned char *s, size_t n)
{
    size_t len = s[0] < 0x80 ? 1 : s[0] < 0xc2 ? 0 : s[0] < 0xe0 ? 2 : s[0] < 0xf0 ? 3 : s[0] < 0xf5 ? 4 : 0;
    if (!len || len > n)
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xf0 && s[1] < 0x90) ||  /* overlong */
        (s[0] == 0xed && s[1] >= 0xa0) || (s[0] == 0xf4 && s[1] >= 0x90))  /* surrogate, > U+10FFFF */
        return 0;
    return len;
}

/* Any bytes as a JSON string: control characters escaped, valid UTF-8 kept, any other byte
   as U+FFFD (as Python's bytes.decode("utf-8", "replace")). */
static void print_string(const char *text, size_t len)
{
    const unsigned char *s = (const unsigned char *)text;
    putchar('"');
    for (size_t i = 0, n; i < len; i += n ? n : 1) {
        n = utf8_length(s + i, len - i);
        if (s[i] == '"' || s[i] == '\\')
            printf("\\%c", s[i]);
        else if (s[i] == '\t')
            fputs("\\t", stdout);
        else if (s[i] < 0x20 || s[i] == 0x7f)
            printf("\\u%04x", s[i]);
        else if (n)
            fwrite(s + i, 1, n, stdout);
        else
            fputs("\\ufffd", stdout);
    }
    putchar('"');
}

static void print_seconds(const char *key, double value)
{
    if (isnan(value))
        printf(", \"%s\": null", key);
    else
        printf(", \"%s\": %.9f", key, value);
}

static void print_result(double cpu, uint64_t requests)
{
    qsort(latencies.v, latencies.n, sizeof *latencies.v, compare);
    qsort(lags.v, lags.n, sizeof *lags.v, compare);
    printf("{\"sent\": %lu, \"window\": %lu, \"failed\": %lu, \"lost\": %lu, \"unmatched\": %lu",
           n_sent, n_window, n_failed, n_lost, n_unmatched);
    print_seconds("p50", percentile(&latencies, 0.50));
    print_seconds("p90", percentile(&latencies, 0.90));
    print_seconds("p99", percentile(&latencies, 0.99));
    print_seconds("max", percentile(&latencies, 1.0));
    print_seconds("lag_p50", percentile(&lags, 0.50));
    print_seconds("lag_p99", percentile(&lags, 0.99));
    print_seconds("lag_max", percentile(&lags, 1.0));
    print_seconds("cpu", cpu);
    printf(", \"samples\": [");
    for (int i = 0; i < n_samples; i++) {
        fputs(i ? ", " : "", stdout);
        print_string(samples[i].text, samples[i].len);
    }
    printf("], \"requests\": %" PRIu64 "}\n", requests);
}

/* -- main --------------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    if (argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS RATE GO WARMUP DURATION DRAIN TAILS\n", argv[0]);
        return 2;
    }
    int n_conns = atoi(argv[3]);
    struct schedule s = {.rate = atof(argv[4]), .go = atof(argv[5]), .tails = read_tails(argv[9])};
    double warmup = atof(argv[6]), duration = atof(argv[7]), drain = atof(argv[8]);
    if (n_conns < 1 || !(s.rate > 0))
        die("CONNECTIONS and RATE must be positive");
    /* Timers may fire up to the slack late: by default 50 µs, a whole interval at 20,000/s, which
       bunches requests meant to be spread (and queues them at the server). 1 µs costs more CPU. */
    prctl(PR_SET_TIMERSLACK, 1000UL);

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int error = getaddrinfo(argv[1], argv[2], &hints, &ai);
    if (error)
        die("%s port %s: %s", argv[1], argv[2], gai_strerror(error));
    struct conn *conns = resize(NULL, n_conns * sizeof *conns);
    struct pollfd *polled = resize(NULL, n_conns * sizeof *polled);
    memset(conns, 0, n_conns * sizeof *conns);
    for (int i = 0; i < n_conns; i++)
        connect_conn(&conns[i], ai);
    freeaddrinfo(ai);
    if (s.go <= 0)
        s.go = now_s();
    else if (now_s() > s.go)
        die("connected only %.3f s after GO", now_s() - s.go);
    t_start = s.go + warmup;
    t_end = t_start + duration;

    double cpu_start = NAN, cpu_end = NAN, drain_end = t_end + drain;
    for (int sending = 1;;) {
        double now = now_s();
        if (isnan(cpu_start) && now >= t_start)
            cpu_start = cpu_s();
        if (sending) {
            send_due(&s, conns, n_conns, now);
            if (due(&s) >= t_end) {
                sending = 0;
                cpu_end = cpu_s();
            }
        } else {
            size_t outstanding = 0;
            for (int i = 0; i < n_conns; i++)
                outstanding += conns[i].outstanding;
            if (!outstanding || now >= drain_end)
                break;
        }
        for (int i = 0; i < n_conns; i++) {
            polled[i].fd = conns[i].fd;  /* poll() skips the closed ones (-1) */
            polled[i].events = POLLIN | (conns[i].out_len ? POLLOUT : 0);
        }
        /* ppoll() takes a timeout in ns, poll() and epoll_wait() in whole ms: they would wake
           up to 1 ms after the next request is due. */
        double wait = (sending ? due(&s) : drain_end) - now_s();
        wait = wait > 0 ? wait : 0;
        struct timespec timeout = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
        if (ppoll(polled, n_conns, &timeout, NULL) < 0 && errno != EINTR)
            die("ppoll: %s", strerror(errno));
        for (int i = 0; i < n_conns; i++) {
            if (polled[i].revents & POLLOUT)
                flush(&conns[i]);
            if (conns[i].fd >= 0 && polled[i].revents & (POLLIN | POLLHUP | POLLERR))
                read_replies(&conns[i]);
        }
    }
    for (int i = 0; i < n_conns; i++)
        n_lost += conns[i].outstanding;
    print_result(cpu_end - cpu_start, s.k);
    return 0;
}
