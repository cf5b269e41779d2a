/*
 * _relay: the native splice relay (issue 22, requirement 4).
 *
 * One relay thread per worker process moves the bytes of every flow handed to it: an
 * edge-triggered epoll loop that splices socket -> pipe -> socket for each direction, so
 * neither the bytes nor the readiness events enter Python.  Python hands over a flow's two
 * connected descriptors (add), may cut it (close), and learns about the end of a flow (and,
 * once a second, about bytes moved by a live one) from a queue it reads when an eventfd
 * becomes readable on its event loop.
 *
 * Why each piece is shaped the way it is:
 *  - Backpressure: a direction reads its source only while its pipe is empty; bytes that
 *    the destination cannot take stay in the pipe and the source is not read meanwhile.
 *  - Delivered bytes: counts grow on the write side (pipe -> destination), so a flow record
 *    never claims bytes that were read but never delivered.
 *  - Half-close: end of stream on one source becomes shutdown(SHUT_WR) of the other socket,
 *    but only after that direction's pipe drained.
 *  - RST: an error on either socket closes both with SO_LINGER 0, so the peer sees a reset.
 *  - Generation-tagged epoll data: every registration carries (slot, generation, side);
 *    a slot's generation changes when its flow ends, so events for an ended flow (already
 *    fetched by epoll_wait, or for a descriptor number reused by a new flow) are dropped.
 *  - Register-before-arm: a flow is complete in the table before its descriptors are added
 *    to epoll, so the first event never finds a half-made flow.  The relay thread itself does
 *    the epoll_ctl(ADD): an ADD of a ready socket wakes the epoll waiter, and done by the loop
 *    (holding the mutex) it woke the relay thread only to block it on that mutex.
 *  - One mutex: the relay thread holds it while it handles one event; Python's add and close
 *    take it, so the thread and the event loop never see a flow half-changed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define POOL_MAX 64
#define COPY_SIZE 65536
#define ROUNDS 16            /* pipe-fulls per direction per wake-up: one busy flow cannot starve others */
#define WAKE_TAG UINT64_MAX  /* epoll data of the stop eventfd */

enum { K_PROGRESS = 0, K_END = 1, K_DROPPED = 2 };
enum { R_EOF = 0, R_RESET, R_IDLE, R_ERROR };

typedef struct {
    int pr, pw;      /* the pipe while this direction holds one, else -1 */
    char *buf;       /* user-space copy buffer when no pipe descriptor could be made */
    size_t held;     /* bytes read from the source and not yet delivered */
    size_t off;      /* copy mode: offset of the first undelivered byte in buf */
    unsigned readable : 1, eof : 1, done : 1;
} dir_t;

typedef struct {
    uint64_t id;
    int fd[2];        /* 0: client side, 1: server side; direction d reads fd[d], writes fd[1-d] */
    dir_t d[2];
    uint64_t bytes[2], reported[2];
    double last;
    int again;        /* queued for another turn (work bound reached) */
} flow_t;

typedef struct {
    uint64_t id, b0, b1;
    int kind, reason, err;
} result_t;

typedef struct {
    PyObject_HEAD
    int ep, notify, wake;
    pthread_t thread;
    int started, stopping;
    pthread_mutex_t mu;
    flow_t **slots;
    uint32_t *gens;
    int nslots, *freelist, nfree;
    uint64_t *again;
    int nagain, capagain;
    uint64_t *pending; /* flows added by the loop, not yet in epoll (the relay thread arms them) */
    int npending, cappending;
    result_t *res;
    size_t nres, capres;
    int notified;
    int pool[POOL_MAX][2];
    int npool;
    int pipe_size;
    double idle, now;
    uint64_t active, total, stale, copies;
} Relay;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t tag(Relay *R, int slot, int side) {
    return ((uint64_t)R->gens[slot] << 32) | ((uint64_t)slot << 1) | (uint64_t)side;
}

/* ------------------------------------------------------------------ pipes */
static int pipe_get(Relay *R, dir_t *p) {
    if (R->npool) {
        R->npool--;
        p->pr = R->pool[R->npool][0];
        p->pw = R->pool[R->npool][1];
        return 0;
    }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
    if (R->pipe_size > 0) (void)fcntl(fds[1], F_SETPIPE_SZ, R->pipe_size);
    p->pr = fds[0];
    p->pw = fds[1];
    return 0;
}

/* an empty pipe goes back to the pool; one that may hold bytes nobody will read is closed */
static void pipe_put(Relay *R, dir_t *p, int empty) {
    if (p->pr < 0) return;
    if (empty && R->npool < POOL_MAX) {
        R->pool[R->npool][0] = p->pr;
        R->pool[R->npool][1] = p->pw;
        R->npool++;
    } else {
        close(p->pr);
        close(p->pw);
    }
    p->pr = p->pw = -1;
}

/* ------------------------------------------------------------------ results */
static void push_result(Relay *R, flow_t *f, int kind, int reason, int err) {
    if (R->nres == R->capres) {
        size_t cap = R->capres ? R->capres * 2 : 256;
        result_t *n = realloc(R->res, cap * sizeof(result_t));
        if (!n) return; /* out of memory: the record loses its byte counts, the relay goes on */
        R->res = n;
        R->capres = cap;
    }
    result_t *r = &R->res[R->nres++];
    r->id = f->id;
    r->b0 = f->bytes[0] - f->reported[0];
    r->b1 = f->bytes[1] - f->reported[1];
    f->reported[0] = f->bytes[0];
    f->reported[1] = f->bytes[1];
    r->kind = kind;
    r->reason = reason;
    r->err = err;
}

static void notify(Relay *R) {
    if (R->nres && !R->notified) {
        uint64_t one = 1;
        if (write(R->notify, &one, sizeof one) == sizeof one) R->notified = 1;
    }
}

/* ------------------------------------------------------------------ flows */
/* Ends a flow: descriptors closed (with SO_LINGER 0 when resetting), slot freed
 * and its generation bumped so later events for it are recognised as stale. */
static void finish(Relay *R, int slot, int reset, int reason, int err, int report) {
    flow_t *f = R->slots[slot];
    static const struct linger l0 = {1, 0};
    for (int s = 0; s < 2; s++) {
        /* no EPOLL_CTL_DEL: closing the relay's (only) descriptor ends the registration; were the
         * socket still open elsewhere (a child between fork and exec), its events would carry
         * this slot's old generation and be dropped */
        if (reset) setsockopt(f->fd[s], SOL_SOCKET, SO_LINGER, &l0, sizeof l0);
        close(f->fd[s]);
        pipe_put(R, &f->d[s], f->d[s].held == 0);
        free(f->d[s].buf);
    }
    if (report) push_result(R, f, K_END, reason, err);
    R->slots[slot] = NULL;
    R->gens[slot]++;
    R->freelist[R->nfree++] = slot;
    R->active--;
    free(f);
}

static int is_reset(int e) {
    return e == ECONNRESET || e == EPIPE || e == ETIMEDOUT || e == EHOSTUNREACH || e == ENETUNREACH;
}

static void fail(Relay *R, int slot, int e) {
    finish(R, slot, 1, is_reset(e) ? R_RESET : R_ERROR, e, 1);
}

/* Moves direction d as far as both sockets allow.  Returns 1 while the flow lives, 0 when it
 * ended, 2 when the work bound was reached with more to do. */
static int pump(Relay *R, int slot, int d) {
    flow_t *f = R->slots[slot];
    dir_t *p = &f->d[d];
    int src = f->fd[d], dst = f->fd[1 - d];
    for (int round = 0; round < ROUNDS; round++) {
        if (p->held) {
            ssize_t m = p->buf ? send(dst, p->buf + p->off, p->held, MSG_NOSIGNAL | MSG_DONTWAIT)
                               : splice(p->pr, NULL, dst, NULL, p->held, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (m < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) return 1; /* destination full: its EPOLLOUT edge resumes us */
                fail(R, slot, errno);
                return 0;
            }
            p->held -= (size_t)m;
            p->off += (size_t)m;
            f->bytes[d] += (uint64_t)m; /* delivered bytes: counted on the write side */
            f->last = R->now;
            if (!p->held) pipe_put(R, p, 1); /* idle directions hold no pipe */
            continue;
        }
        if (p->eof) {
            if (!p->done) {
                p->done = 1;
                shutdown(dst, SHUT_WR); /* the FIN goes on once every byte before it did */
                if (f->d[1 - d].done) {
                    finish(R, slot, 0, R_EOF, 0, 1);
                    return 0;
                }
            }
            return 1;
        }
        if (!p->readable) return 1;
        if (!p->buf && p->pr < 0 && pipe_get(R, p) < 0) {
            if (errno != EMFILE && errno != ENFILE) {
                fail(R, slot, errno);
                return 0;
            }
            /* no descriptor for a pipe: copy through user space rather than drop allowed bytes */
            p->buf = malloc(COPY_SIZE);
            if (!p->buf) {
                fail(R, slot, ENOMEM);
                return 0;
            }
            R->copies++;
        }
        ssize_t n = p->buf ? recv(src, p->buf, COPY_SIZE, MSG_DONTWAIT)
                           : splice(src, NULL, p->pw, NULL, (size_t)R->pipe_size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                p->readable = 0; /* drained: the next EPOLLIN edge sets it again */
                pipe_put(R, p, 1);
                if (p->buf) {
                    free(p->buf);
                    p->buf = NULL; /* try a pipe again next time */
                }
                return 1;
            }
            fail(R, slot, errno);
            return 0;
        }
        if (n == 0) {
            p->eof = 1;
            p->readable = 0;
            pipe_put(R, p, 1);
            continue;
        }
        p->held = (size_t)n;
        p->off = 0;
        f->last = R->now;
    }
    return 2;
}

static void queue_again(Relay *R, int slot) {
    flow_t *f = R->slots[slot];
    if (f->again) return;
    if (R->nagain == R->capagain) {
        int cap = R->capagain ? R->capagain * 2 : 64;
        uint64_t *n = realloc(R->again, (size_t)cap * sizeof(uint64_t));
        if (!n) return; /* the next edge on this flow resumes it */
        R->again = n;
        R->capagain = cap;
    }
    f->again = 1;
    R->again[R->nagain++] = tag(R, slot, 0);
}

static void handle(Relay *R, int slot) {
    int more = 0;
    for (int d = 0; d < 2; d++) {
        int r = pump(R, slot, d);
        if (r == 0) return;
        if (r == 2) more = 1;
    }
    if (more) queue_again(R, slot);
}

/* resolves epoll data to a live slot, or -1 when the flow it was registered for has ended */
static int lookup(Relay *R, uint64_t t) {
    uint32_t slot = (uint32_t)(t & 0xffffffffu) >> 1;
    if ((int)slot >= R->nslots || !R->slots[slot] || R->gens[slot] != (uint32_t)(t >> 32)) {
        R->stale++;
        return -1;
    }
    return (int)slot;
}

static void tick(Relay *R) {
    for (int s = 0; s < R->nslots; s++) {
        flow_t *f = R->slots[s];
        if (!f) continue;
        if (R->idle > 0 && R->now - f->last > R->idle)
            finish(R, s, 1, R_IDLE, 0, 1);
        else if (f->bytes[0] != f->reported[0] || f->bytes[1] != f->reported[1])
            push_result(R, f, K_PROGRESS, 0, 0); /* keeps the flow's activity time fresh in Python */
    }
}

/* puts the flows the loop added into epoll (relay thread, under the mutex) */
static void arm_pending(Relay *R) {
    for (int i = 0; i < R->npending; i++) {
        int slot = lookup(R, R->pending[i]);
        if (slot < 0) {
            R->stale--; /* cut by the loop before it was armed: not an epoll event */
            continue;
        }
        flow_t *f = R->slots[slot];
        for (int s = 0; s < 2; s++) {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = tag(R, slot, s)};
            if (epoll_ctl(R->ep, EPOLL_CTL_ADD, f->fd[s], &ev) < 0) {
                fail(R, slot, errno); /* reported like any failed flow: error:<errno> */
                break;
            }
        }
    }
    R->npending = 0;
}

/* one epoll event, under the mutex */
static void on_event(Relay *R, uint64_t t, uint32_t e) {
    int slot = lookup(R, t);
    if (slot < 0) return;
    flow_t *f = R->slots[slot];
    int side = (int)(t & 1);
    if (e & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(f->fd[side], SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err) {
            fail(R, slot, err); /* also an RST on a half-closed side nobody reads */
            return;
        }
    }
    if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) f->d[side].readable = 1;
    handle(R, slot);
}

/* The relay thread.  The mutex is taken per event, not per batch: the event loop's add/close
 * then wait for at most one flow's splices, not a whole batch's (that wait, with the GIL held,
 * was most of add()'s cost under connection churn). */
static void *run(void *arg) {
    Relay *R = arg;
    struct epoll_event ev[MAX_EVENTS];
    double next_tick = mono() + 1.0;
    for (;;) {
        int timeout = R->nagain ? 0 : (int)((next_tick - mono()) * 1000) + 1;
        if (timeout < 0) timeout = 0;
        int n = epoll_wait(R->ep, ev, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) break;
        int woken = 0;
        for (int i = 0; i < n; i++) woken |= ev[i].data.u64 == WAKE_TAG;
        pthread_mutex_lock(&R->mu);
        if (R->stopping) {
            pthread_mutex_unlock(&R->mu);
            break;
        }
        R->now = mono();
        if (woken) { /* cleared before the queue is taken: an add after this wakes us again */
            uint64_t v;
            if (read(R->wake, &v, sizeof v) < 0) { /* EAGAIN: nothing to clear */ }
        }
        arm_pending(R);
        int nagain = R->nagain;
        R->nagain = 0;
        for (int i = 0; i < nagain; i++) { /* flows that hit the work bound last turn */
            int slot = lookup(R, R->again[i]);
            if (slot < 0) continue;
            R->slots[slot]->again = 0;
            handle(R, slot);
        }
        pthread_mutex_unlock(&R->mu);
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u64 == WAKE_TAG) continue;
            pthread_mutex_lock(&R->mu);
            on_event(R, ev[i].data.u64, ev[i].events);
            pthread_mutex_unlock(&R->mu);
        }
        pthread_mutex_lock(&R->mu);
        if (R->now >= next_tick) {
            tick(R);
            next_tick = R->now + 1.0;
        }
        notify(R);
        pthread_mutex_unlock(&R->mu);
    }
    return NULL;
}

/* ------------------------------------------------------------------ Python type */
static int Relay_init(Relay *R, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"idle_timeout", "pipe_size", NULL};
    double idle = 0;
    int pipe_size = 1 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|di", kwlist, &idle, &pipe_size)) return -1;
    if (R->started) {
        PyErr_SetString(PyExc_RuntimeError, "relay already started");
        return -1;
    }
    R->idle = idle;
    R->pipe_size = pipe_size > 4096 ? pipe_size : 65536;
    R->ep = epoll_create1(EPOLL_CLOEXEC);
    R->notify = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    R->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (R->ep < 0 || R->notify < 0 || R->wake < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    epoll_ctl(R->ep, EPOLL_CTL_ADD, R->wake, &ev);
    pthread_mutex_init(&R->mu, NULL);
    R->now = mono();
    /* the relay thread takes no signals: SIGTERM and friends stay with Python's main thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&R->thread, NULL, run, R);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    R->started = 1;
    return 0;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Relay *R = (Relay *)type->tp_alloc(type, 0);
    if (R) R->ep = R->notify = R->wake = -1;
    return (PyObject *)R;
}

static int grow(Relay *R) {
    int n = R->nslots ? R->nslots * 2 : 1024;
    flow_t **s = realloc(R->slots, (size_t)n * sizeof *s);
    if (!s) return -1;
    R->slots = s;
    uint32_t *g = realloc(R->gens, (size_t)n * sizeof *g);
    if (!g) return -1;
    R->gens = g;
    int *fl = realloc(R->freelist, (size_t)n * sizeof *fl);
    if (!fl) return -1;
    R->freelist = fl;
    for (int i = n - 1; i >= R->nslots; i--) {
        R->slots[i] = NULL;
        R->gens[i] = 1;
        R->freelist[R->nfree++] = i;
    }
    R->nslots = n;
    return 0;
}

static int grow_pending(Relay *R) {
    int cap = R->cappending ? R->cappending * 2 : 64;
    uint64_t *p = realloc(R->pending, (size_t)cap * sizeof *p);
    if (!p) return -1;
    R->pending = p;
    R->cappending = cap;
    return 0;
}

/* add(id, client_fd, server_fd) -> handle.  The relay owns both descriptors from here on. */
static PyObject *Relay_add(Relay *R, PyObject *args) {
    unsigned long long id;
    int cfd, sfd;
    if (!PyArg_ParseTuple(args, "Kii", &id, &cfd, &sfd)) return NULL;
    if (!R->started || R->stopping) return PyErr_Format(PyExc_RuntimeError, "relay is stopped");
    flow_t *f = calloc(1, sizeof *f);
    if (!f) return PyErr_NoMemory();
    f->id = id;
    f->fd[0] = cfd;
    f->fd[1] = sfd;
    for (int d = 0; d < 2; d++) f->d[d].pr = f->d[d].pw = -1;
    int on = 1; /* a blocking descriptor would stall every flow of the process: never trust the caller */
    if (ioctl(cfd, FIONBIO, &on) < 0 || ioctl(sfd, FIONBIO, &on) < 0) {
        free(f);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_mutex_lock(&R->mu);
    if ((!R->nfree && grow(R) < 0) || (R->npending == R->cappending && grow_pending(R) < 0)) {
        pthread_mutex_unlock(&R->mu);
        free(f);
        return PyErr_NoMemory();
    }
    int slot = R->freelist[--R->nfree];
    f->last = mono();
    R->slots[slot] = f; /* register before arm: complete in the table before epoll can report it */
    R->active++;
    R->total++;
    uint64_t h = tag(R, slot, 0);
    R->pending[R->npending++] = h;
    int first = R->npending == 1;
    pthread_mutex_unlock(&R->mu);
    if (first) { /* the relay thread takes the whole queue when it wakes: one write per batch */
        uint64_t one = 1;
        if (write(R->wake, &one, sizeof one) < 0) { /* the counter cannot overflow here */ }
    }
    return PyLong_FromUnsignedLongLong(h);
}

/* close(handle, reset) -> (bytes_to_server, bytes_to_client) not yet reported, or None when the
 * relay already ended the flow (its end is in the result queue). */
static PyObject *Relay_close(Relay *R, PyObject *args) {
    unsigned long long h;
    int reset;
    if (!PyArg_ParseTuple(args, "Kp", &h, &reset)) return NULL;
    pthread_mutex_lock(&R->mu);
    int slot = lookup(R, h);
    if (slot < 0) {
        R->stale--; /* not an epoll event */
        pthread_mutex_unlock(&R->mu);
        Py_RETURN_NONE;
    }
    flow_t *f = R->slots[slot];
    unsigned long long b0 = f->bytes[0] - f->reported[0], b1 = f->bytes[1] - f->reported[1];
    /* progress results of this flow still queued would arrive after its end: fold them in */
    for (size_t i = 0; i < R->nres; i++) {
        result_t *r = &R->res[i];
        if (r->id == f->id && r->kind == K_PROGRESS) {
            b0 += r->b0;
            b1 += r->b1;
            r->kind = K_DROPPED;
        }
    }
    finish(R, slot, reset, 0, 0, 0);
    pthread_mutex_unlock(&R->mu);
    return Py_BuildValue("KK", b0, b1);
}

static const char *reason_name(int r) {
    switch (r) {
    case R_EOF: return "eof";
    case R_RESET: return "reset";
    case R_IDLE: return "idle-timeout";
    default: return "error";
    }
}

/* results() -> [(id, ended, bytes_to_server, bytes_to_client, reason)]; clears the queue */
static PyObject *Relay_results(Relay *R, PyObject *noargs) {
    uint64_t v;
    if (read(R->notify, &v, sizeof v) < 0 && errno != EAGAIN) return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&R->mu);
    result_t *res = R->res;
    size_t n = R->nres;
    R->res = NULL;
    R->nres = R->capres = 0;
    R->notified = 0;
    pthread_mutex_unlock(&R->mu);
    size_t live = 0;
    for (size_t i = 0; i < n; i++) live += res[i].kind != K_DROPPED;
    PyObject *out = PyList_New((Py_ssize_t)live);
    for (size_t i = 0, j = 0; out && i < n; i++) {
        result_t *r = &res[i];
        if (r->kind == K_DROPPED) continue;
        PyObject *reason = r->kind == K_PROGRESS ? Py_NewRef(Py_None)
                           : r->reason == R_ERROR ? PyUnicode_FromFormat("error:%d", r->err)
                                                  : PyUnicode_FromString(reason_name(r->reason));
        PyObject *t = reason ? Py_BuildValue("KOKKN", (unsigned long long)r->id, r->kind == K_END ? Py_True : Py_False,
                                             (unsigned long long)r->b0, (unsigned long long)r->b1, reason)
                             : NULL;
        if (!t) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)j++, t);
    }
    free(res);
    return out;
}

static PyObject *Relay_fileno(Relay *R, PyObject *noargs) { return PyLong_FromLong(R->notify); }

static PyObject *Relay_stats(Relay *R, PyObject *noargs) {
    pthread_mutex_lock(&R->mu);
    PyObject *d = Py_BuildValue("{sKsKsKsKsi}", "active", (unsigned long long)R->active, "total",
                                (unsigned long long)R->total, "stale_events", (unsigned long long)R->stale,
                                "copy_fallbacks", (unsigned long long)R->copies, "spare_pipes", R->npool);
    pthread_mutex_unlock(&R->mu);
    return d;
}

/* stop(): ends the thread and resets every flow still open (their ends are not reported) */
static PyObject *Relay_stop(Relay *R, PyObject *noargs) {
    if (!R->started) Py_RETURN_NONE;
    pthread_mutex_lock(&R->mu);
    R->stopping = 1;
    pthread_mutex_unlock(&R->mu);
    uint64_t one = 1;
    if (write(R->wake, &one, sizeof one) < 0) { /* eventfd cannot be full here */ }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(R->thread, NULL);
    Py_END_ALLOW_THREADS
    R->started = 0;
    for (int s = 0; s < R->nslots; s++)
        if (R->slots[s]) finish(R, s, 1, R_RESET, 0, 0);
    for (int i = 0; i < R->npool; i++) {
        close(R->pool[i][0]);
        close(R->pool[i][1]);
    }
    R->npool = 0;
    Py_RETURN_NONE;
}

static void Relay_dealloc(Relay *R) {
    PyObject *r = Relay_stop(R, NULL);
    Py_XDECREF(r);
    for (int i = 0; i < 3; i++) {
        int fd = i == 0 ? R->ep : i == 1 ? R->notify : R->wake;
        if (fd >= 0) close(fd);
    }
    free(R->slots);
    free(R->gens);
    free(R->freelist);
    free(R->again);
    free(R->pending);
    free(R->res);
    Py_TYPE(R)->tp_free((PyObject *)R);
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS, "add(id, client_fd, server_fd) -> handle; the relay owns the fds"},
    {"close", (PyCFunction)Relay_close, METH_VARARGS, "close(handle, reset) -> (b0, b1) or None if already ended"},
    {"results", (PyCFunction)Relay_results, METH_NOARGS, "[(id, ended, b0, b1, reason)] since the last call"},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "eventfd readable when results() has something"},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "counters"},
    {"stop", (PyCFunction)Relay_stop, METH_NOARGS, "stop the thread, reset open flows"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "firewall.datapath._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One relay thread splicing every flow handed to it (edge-triggered epoll).",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

static struct PyModuleDef relaymodule = {PyModuleDef_HEAD_INIT, "_relay", "Native splice relay.", -1, NULL};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&relaymodule);
    if (!m) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
