/*
 * splice-relay: a plain TCP relay that never copies a byte into user space (splice(2)
 * through a pipe, one thread per direction). It is not a proxy anyone should run: it exists
 * to measure, in the benchmark harness, the most that two relays in the harness's topology
 * can move on this machine when they do no TLS and no user-space copy at all. consul-proxy's
 * bulk figures are read against that ceiling (BENCHMARKS.md).
 *
 *   splice-relay LISTEN_PORT TARGET_PORT     (both on 127.0.0.1)
 *
 * Build: cc -O2 -pthread -o splice-relay splice-relay.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* Bytes asked of each splice call; the pipe is sized to match. */
#define CHUNK (1 << 20)

struct direction {
    int from, to;
    int *refs;
    pthread_mutex_t *lock;
};

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Moves bytes from `from` to `to` until EOF or an error, then half-closes `to`. The last of
 * the two directions to finish closes both sockets. */
static void *pump(void *arg) {
    struct direction *d = arg;
    int p[2];
    if (pipe2(p, O_CLOEXEC) == 0) {
        fcntl(p[1], F_SETPIPE_SZ, CHUNK);
        for (;;) {
            ssize_t n = splice(d->from, NULL, p[1], NULL, CHUNK, SPLICE_F_MOVE | SPLICE_F_MORE);
            if (n <= 0)
                break;
            while (n > 0) {
                /* No SPLICE_F_MORE here: it would hold back the tail of each write. */
                ssize_t m = splice(p[0], NULL, d->to, NULL, (size_t)n, SPLICE_F_MOVE);
                if (m <= 0)
                    goto out;
                n -= m;
            }
        }
    out:
        close(p[0]);
        close(p[1]);
    }
    shutdown(d->to, SHUT_WR);
    pthread_mutex_lock(d->lock);
    int last = --*d->refs == 0;
    pthread_mutex_unlock(d->lock);
    if (last) {
        close(d->from);
        close(d->to);
        free(d->refs);
        free(d->lock);
    }
    free(d);
    return NULL;
}

static void start(int from, int to, int *refs, pthread_mutex_t *lock) {
    struct direction *d = malloc(sizeof *d);
    pthread_t t;
    if (d == NULL) {
        perror("malloc");
        exit(1);
    }
    pthread_attr_t attr;
    d->from = from;
    d->to = to;
    d->refs = refs;
    d->lock = lock;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    if (pthread_create(&t, &attr, pump, d) != 0) {
        perror("pthread_create");
        exit(1);
    }
    pthread_attr_destroy(&attr);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT TARGET_PORT\n", argv[0]);
        return 2;
    }
    /* A peer that has gone away must fail that splice, not kill every connection. */
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in listen_addr = loopback(atoi(argv[1]));
    struct sockaddr_in target = loopback(atoi(argv[2]));
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (l < 0) {
        perror("socket");
        return 1;
    }
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&listen_addr, sizeof listen_addr) != 0 || listen(l, 4096) != 0) {
        perror("listen");
        return 1;
    }
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("accept");
            return 1;
        }
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&target, sizeof target) != 0) {
            perror("connect");
            close(c);
            close(s);
            continue;
        }
        nodelay(c);
        nodelay(s);
        int *refs = malloc(sizeof *refs);
        pthread_mutex_t *lock = malloc(sizeof *lock);
        if (refs == NULL || lock == NULL) {
            perror("malloc");
            return 1;
        }
        *refs = 2;
        pthread_mutex_init(lock, NULL);
        start(c, s, refs, lock);
        start(s, c, refs, lock);
    }
}
