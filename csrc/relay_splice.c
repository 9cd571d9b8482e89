/* labrelay's native data path; see relay_splice.h for the contract and
 * docs/datapath.md for the design and its measurements. */

#define _GNU_SOURCE

#ifndef __linux__
#error "labrelay's native data path needs Linux (splice, epoll, eventfd)"
#endif

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "relay_splice.h"

#define MAX_CALL ((size_t)1 << 30)
#define SPLICE_FLAGS (SPLICE_F_NONBLOCK | SPLICE_F_MOVE)

/* ------------------------------------------------------------------------- */
/* the pipe pool */

int lr_pool_init(struct lr_pool *pool, int max_total, int max_idle, int pipe_size)
{
    memset(pool, 0, sizeof *pool);
    if (max_total < 0 || max_idle < 0 || pipe_size < 0)
        return -EINVAL;
    if (max_idle > max_total)
        max_idle = max_total;
    pool->fds = calloc((size_t)(max_idle > 0 ? max_idle : 1) * 2, sizeof(int));
    if (pool->fds == NULL)
        return -ENOMEM;
    pool->max_idle = max_idle;
    pool->max_total = max_total;
    pool->pipe_size = pipe_size;
    return 0;
}

void lr_pool_destroy(struct lr_pool *pool)
{
    int i;

    if (pool->fds == NULL)
        return;
    for (i = 0; i < pool->idle * 2; i++)
        close(pool->fds[i]);
    pool->total -= pool->idle;
    pool->idle = 0;
    free(pool->fds);
    pool->fds = NULL;
}

/* An empty pipe, or -ENOBUFS at the cap (the caller copies instead), or -errno. */
static int pool_get(struct lr_pool *pool, int *r, int *w)
{
    int fds[2];

    if (pool->idle > 0) {
        pool->idle--;
        *r = pool->fds[2 * pool->idle];
        *w = pool->fds[2 * pool->idle + 1];
        return 0;
    }
    if (pool->fds == NULL || pool->total >= pool->max_total)
        return -ENOBUFS;
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return -errno;
    /* Best effort: past /proc/sys/fs/pipe-max-size or the user's pipe quota the
     * kernel refuses, and the pipe keeps its default size. */
    if (pool->pipe_size > 0)
        (void)fcntl(fds[1], F_SETPIPE_SZ, pool->pipe_size);
    pool->actual_size = fcntl(fds[1], F_GETPIPE_SZ);
    pool->total++;
    *r = fds[0];
    *w = fds[1];
    return 0;
}

/* Only an empty pipe may be reused: one that still holds bytes is closed. */
static void pool_put(struct lr_pool *pool, int r, int w, int empty)
{
    if (empty && pool->fds != NULL && pool->idle < pool->max_idle) {
        pool->fds[2 * pool->idle] = r;
        pool->fds[2 * pool->idle + 1] = w;
        pool->idle++;
        return;
    }
    close(r);
    close(w);
    pool->total--;
}

/* ------------------------------------------------------------------------- */
/* one direction */

static uint64_t held(const struct lr_dir *d)
{
    return d->pipe_held + (d->buf_len - d->buf_off);
}

static int refused(ssize_t rc)
{
    return rc == -EINVAL || rc == -ENOSYS || rc == -EOPNOTSUPP;
}

static int ensure_buf(struct lr_dir *d, size_t want)
{
    if (d->buf != NULL && d->buf_cap >= want)
        return 0;
    if (d->buf != NULL && d->buf_len > d->buf_off)
        return -EBUSY;
    free(d->buf);
    d->buf = malloc(want);
    d->buf_off = d->buf_len = 0;
    d->buf_cap = d->buf != NULL ? want : 0;
    return d->buf != NULL ? 0 : -ENOMEM;
}

static void drop_empty_buf(struct lr_dir *d)
{
    if (d->buf != NULL && d->buf_len == d->buf_off) {
        free(d->buf);
        d->buf = NULL;
        d->buf_off = d->buf_len = d->buf_cap = 0;
    }
}

int lr_dir_prefix(struct lr_dir *d, const unsigned char *data, size_t len)
{
    unsigned char *grown;
    size_t pending;

    if (len == 0)
        return 0;
    if (d->pipe_held > 0)
        return -EBUSY; /* the prefix must come before anything spliced */
    pending = d->buf_len - d->buf_off;
    grown = malloc(pending + len > LR_COPY_BUF_SIZE ? pending + len : LR_COPY_BUF_SIZE);
    if (grown == NULL)
        return -ENOMEM;
    if (pending > 0)
        memcpy(grown, d->buf + d->buf_off, pending);
    memcpy(grown + pending, data, len);
    free(d->buf);
    d->buf = grown;
    d->buf_off = 0;
    d->buf_len = pending + len;
    d->buf_cap = pending + len > LR_COPY_BUF_SIZE ? pending + len : LR_COPY_BUF_SIZE;
    return 0;
}

static ssize_t do_splice(int in, int out, size_t len)
{
    ssize_t n = splice(in, NULL, out, NULL, len, SPLICE_FLAGS);
    return n < 0 ? -errno : n;
}

static ssize_t write_out(struct lr_dir *d, const unsigned char *data, size_t len)
{
    ssize_t n;

    d->syscalls++;
    if (d->flags & LR_DIR_OUT_SOCKET)
        n = send(d->out_fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    else
        n = write(d->out_fd, data, len);
    return n < 0 ? -errno : n;
}

/* Write some held bytes: the buffer first (it is older), then the pipe. */
static ssize_t deliver(struct lr_dir *d)
{
    ssize_t n;

    if (d->buf_len > d->buf_off) {
        n = write_out(d, d->buf + d->buf_off, d->buf_len - d->buf_off);
        if (n > 0) {
            d->buf_off += (size_t)n;
            if (d->buf_off == d->buf_len)
                d->buf_off = d->buf_len = 0;
        }
        return n;
    }
    if (d->flags & LR_DIR_COPY) {
        /* Splice was refused with bytes already in the pipe: they go out through
         * the buffer, so none is lost and the order is kept. */
        size_t take = d->pipe_held < LR_COPY_BUF_SIZE ? (size_t)d->pipe_held : LR_COPY_BUF_SIZE;
        int rc = ensure_buf(d, LR_COPY_BUF_SIZE);
        if (rc < 0)
            return rc;
        d->syscalls++;
        n = read(d->pipe_r, d->buf, take);
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        d->pipe_held -= (uint64_t)n;
        d->buf_off = 0;
        d->buf_len = (size_t)n;
        return deliver(d);
    }
    d->syscalls++;
    n = do_splice(d->pipe_r, d->out_fd, (size_t)d->pipe_held);
    if (n > 0)
        d->pipe_held -= (uint64_t)n;
    return n;
}

/* Read into an empty pipe (or the buffer).  *cap gets the most this call could read. */
static ssize_t fill(struct lr_dir *d, struct lr_pool *pool, size_t len, size_t *cap)
{
    ssize_t n;

    if (!(d->flags & LR_DIR_COPY)) {
        if (d->pipe_r >= 0 || pool_get(pool, &d->pipe_r, &d->pipe_w) == 0) {
            d->syscalls++;
            n = do_splice(d->in_fd, d->pipe_w, len);
            *cap = pool->actual_size > 0 && (size_t)pool->actual_size < len
                       ? (size_t)pool->actual_size : len;
            if (n > 0) {
                d->pipe_held += (uint64_t)n;
                return n;
            }
            if (!refused(n))
                return n;
            /* This fd cannot be spliced (e.g. not a socket or pipe): this
             * direction alone copies from now on. */
            d->flags |= LR_DIR_COPY | LR_DIR_FELL_BACK;
            pool_put(pool, d->pipe_r, d->pipe_w, 1);
            d->pipe_r = d->pipe_w = -1;
        }
        /* else: every pipe is in use; copy this once */
    }
    if (ensure_buf(d, LR_COPY_BUF_SIZE) < 0)
        return -ENOMEM;
    if (len > d->buf_cap)
        len = d->buf_cap;
    *cap = len;
    d->syscalls++;
    n = read(d->in_fd, d->buf, len);
    if (n < 0)
        return -errno;
    d->buf_off = 0;
    d->buf_len = (size_t)n;
    return n;
}

static void shut_out(struct lr_dir *d)
{
    if (d->flags & LR_DIR_OUT_SOCKET) {
        (void)shutdown(d->out_fd, SHUT_WR);
    } else if ((d->flags & LR_DIR_OUT_CLOSE) && d->out_fd >= 0) {
        close(d->out_fd);
        d->out_fd = -1;
    }
}

void lr_dir_release(struct lr_dir *d, struct lr_pool *pool)
{
    if (d->pipe_r >= 0) {
        pool_put(pool, d->pipe_r, d->pipe_w, d->pipe_held == 0);
        d->pipe_r = d->pipe_w = -1;
        d->pipe_held = 0;
    }
    free(d->buf);
    d->buf = NULL;
    d->buf_off = d->buf_len = d->buf_cap = 0;
}

/* One end is a pipe already (labrelay connect's stdin/stdout): the kernel moves
 * pipe <-> socket in one call, half the syscalls of going through a pipe of ours, and
 * nothing is ever held here.  -EINTR: try again (it switched to a pipe of ours). */
static ssize_t straight_across(struct lr_dir *d, size_t len)
{
    ssize_t n;
    int avail = 0;

    d->syscalls++;
    n = do_splice(d->in_fd, d->out_fd, len);
    if (n > 0) {
        d->moved += (uint64_t)n;
        return n;
    }
    /* Splice into a pipe whose reader left fails even with nothing to move; with
     * nothing waiting in in_fd that is no error yet: a pipe of ours fails only if
     * bytes do arrive (labrelay connect after ssh exited). */
    if (refused(n) || (n == -EPIPE && !(d->flags & LR_DIR_IN_PIPE)
                       && ioctl(d->in_fd, FIONREAD, &avail) == 0 && avail == 0)) {
        d->flags &= ~(unsigned int)LR_DIR_DIRECT;
        return -EINTR;
    }
    return n;
}

/* After EAGAIN straight across: empty input or full output; bytes waiting in in_fd
 * say which. */
static int straight_wait(struct lr_dir *d)
{
    int avail = 0;
    return ioctl(d->in_fd, FIONREAD, &avail) == 0 && avail > 0 ? LR_WAIT_OUT : LR_WAIT_IN;
}

int lr_move(struct lr_dir *d, struct lr_pool *pool, uint64_t budget, uint64_t *moved_out)
{
    uint64_t moved = 0;
    int rc, short_read = 0, straight;
    ssize_t n;
    size_t want, cap;

    if (d->flags & LR_DIR_DONE) {
        rc = LR_DONE;
        goto out;
    }
    for (;;) {
        /* 1. whatever is held goes out first: the pipe is empty before it is refilled */
        while (held(d) > 0) {
            n = deliver(d);
            if (n > 0) {
                moved += (uint64_t)n;
                d->moved += (uint64_t)n;
                continue;
            }
            if (n == -EINTR)
                continue;
            if (n == -EAGAIN) {
                rc = LR_WAIT_OUT;
                goto out;
            }
            if (refused(n) && !(d->flags & LR_DIR_COPY)) {
                d->flags |= LR_DIR_COPY | LR_DIR_FELL_BACK;
                continue;
            }
            d->err_side = LR_SIDE_OUT;
            rc = n == 0 ? -EIO : (int)n;
            goto out;
        }
        if (d->flags & LR_DIR_EOF) {
            shut_out(d);
            d->flags |= LR_DIR_DONE;
            rc = LR_DONE;
            goto out;
        }
        if (moved >= budget) {
            rc = LR_MOVED;
            goto out;
        }
        if (short_read) {
            rc = LR_WAIT_IN;
            goto out;
        }
        want = budget - moved < MAX_CALL ? (size_t)(budget - moved) : MAX_CALL;

        /* 2. a regular file goes straight to out_fd */
        if (d->flags & LR_DIR_IN_FILE) {
            d->syscalls++;
            n = sendfile(d->out_fd, d->in_fd, NULL, want);
            if (n < 0)
                n = -errno;
            if (n > 0) {
                moved += (uint64_t)n;
                d->moved += (uint64_t)n;
            } else if (n == 0) {
                d->flags |= LR_DIR_EOF;
            } else if (n == -EAGAIN) {
                rc = LR_WAIT_OUT;
                goto out;
            } else if (refused(n)) {
                d->flags = (d->flags & ~(unsigned int)LR_DIR_IN_FILE) | LR_DIR_FELL_BACK;
            } else if (n != -EINTR) {
                d->err_side = n == -EIO ? LR_SIDE_IN : LR_SIDE_OUT;
                rc = (int)n;
                goto out;
            }
            continue;
        }

        /* 3. move straight across (one end is a pipe already), or read into the
         * (empty) pipe or buffer */
        straight = (d->flags & LR_DIR_DIRECT) && !(d->flags & LR_DIR_COPY);
        if (straight) {
            cap = want;
            n = straight_across(d, want);
        } else {
            n = fill(d, pool, want, &cap);
        }
        if (n > 0) {
            if (straight)
                moved += (uint64_t)n;
            if ((d->flags & LR_DIR_SHORT_WAITS) && (size_t)n < cap)
                short_read = 1; /* most likely drained: let the poller say if not */
            continue;
        }
        if (n == 0) {
            d->flags |= LR_DIR_EOF;
            continue;
        }
        if (n == -EINTR)
            continue;
        if (n == -EAGAIN) {
            rc = straight ? straight_wait(d) : LR_WAIT_IN;
            goto out;
        }
        /* EPIPE: out_fd's reader is gone; a pipe -> socket move failed on the socket */
        d->err_side = straight && (n == -EPIPE || (d->flags & LR_DIR_IN_PIPE)) ? LR_SIDE_OUT
                                                                              : LR_SIDE_IN;
        rc = (int)n;
        goto out;
    }
out:
    if (held(d) == 0) {
        if (d->pipe_r >= 0) {
            pool_put(pool, d->pipe_r, d->pipe_w, 1);
            d->pipe_r = d->pipe_w = -1;
        }
        drop_empty_buf(d);
    }
    *moved_out += moved;
    return rc;
}

/* ------------------------------------------------------------------------- */
/* the pump thread */

#define MAX_EVENTS 256
#define ID_SLOT_BITS 24
#define ID_SLOT_MASK ((1 << ID_SLOT_BITS) - 1)

struct lr_ep {
    int fd;
    uint32_t registered; /* epoll mask now registered; 0 = not in the epoll set */
    int pollable;        /* 0: epoll refuses it (regular file): always ready */
    int is_socket;
    int is_pipe;
    struct lr_pair *pair;
};

struct lr_pair {
    int64_t id;
    struct lr_dir dir[2];  /* 0: a -> b, 1: b -> a */
    int wait[2];           /* the last lr_move result */
    unsigned int runnable; /* bit i: run dir[i] on the next turn */
    struct lr_ep ep[4];
    int nep;
    int ended, published, queued;
    int err, side;
    unsigned int end_flags;
    uint64_t seen[2];      /* dir[i].moved, published for other threads */
    struct lr_pair *next;  /* on the add list, the ended list or the done list */
    struct lr_pair *next_turn;
};

struct lr_pump {
    pthread_t thread;
    int epfd, wakefd, notifyfd;
    struct lr_pool pool;
    uint64_t budget;
    unsigned int dir_flags;

    /* owned by the pump thread */
    struct lr_pair *turns;
    struct lr_pair *ended;

    /* shared, under lock */
    pthread_mutex_t lock;
    int stop;
    struct lr_pair *adds, **adds_tail;
    int64_t *aborts;
    int naborts, cap_aborts;
    struct lr_pair *done, **done_tail;
    struct lr_pair **slots;
    uint32_t *gens;
    int nslots, free_hint;

    /* statistics, atomics */
    struct lr_pump_stats stats;
};

#define STAT_ADD(p, field, n) __atomic_fetch_add(&(p)->stats.field, (n), __ATOMIC_RELAXED)
#define STAT_SUB(p, field, n) __atomic_fetch_sub(&(p)->stats.field, (n), __ATOMIC_RELAXED)
#define STAT_GET(p, field) __atomic_load_n(&(p)->stats.field, __ATOMIC_RELAXED)

static void wake(int fd)
{
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof one);
    (void)ignored;
}

static void drain(int fd)
{
    uint64_t value;
    ssize_t ignored = read(fd, &value, sizeof value);
    (void)ignored;
}

static void schedule(struct lr_pump *p, struct lr_pair *pr, unsigned int dirs)
{
    pr->runnable |= dirs;
    if (!pr->queued) {
        pr->queued = 1;
        pr->next_turn = p->turns;
        p->turns = pr;
    }
}

static void end_pair(struct lr_pump *p, struct lr_pair *pr, int err, int side, unsigned int flags)
{
    struct linger reset = {1, 0};
    int i;

    if (pr->ended)
        return;
    pr->ended = 1;
    pr->err = err;
    pr->side = side;
    pr->end_flags |= flags;
    for (i = 0; i < 2; i++)
        if (pr->dir[i].flags & LR_DIR_FELL_BACK)
            pr->end_flags |= LR_END_FELL_BACK;
    for (i = 0; i < pr->nep; i++) {
        struct lr_ep *e = &pr->ep[i];
        if (e->fd < 0)
            continue;
        if (e->registered)
            (void)epoll_ctl(p->epfd, EPOLL_CTL_DEL, e->fd, NULL);
        e->registered = 0;
        /* An error on one end resets the other: its peer must not take a
         * truncated stream for a complete one. */
        if (err != 0 && e->is_socket)
            (void)setsockopt(e->fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(e->fd);
        e->fd = -1;
    }
    for (i = 0; i < 2; i++) {
        __atomic_store_n(&pr->seen[i], pr->dir[i].moved, __ATOMIC_RELAXED);
        lr_dir_release(&pr->dir[i], &p->pool);
    }
    if (pr->end_flags & LR_END_FELL_BACK)
        STAT_ADD(p, fell_back, 1);
    STAT_SUB(p, pairs_active, 1);
    pr->next = p->ended;
    p->ended = pr;
}

/* Make the epoll set want what the directions wait for; closes an out fd that
 * is not a socket once its direction is done (that is its EOF). */
static int update_interest(struct lr_pump *p, struct lr_pair *pr)
{
    int i, j;

    for (i = 0; i < pr->nep; i++) {
        struct lr_ep *e = &pr->ep[i];
        uint32_t want = 0;
        struct epoll_event ev;

        if (e->fd < 0)
            continue;
        for (j = 0; j < 2; j++) {
            if (pr->dir[j].flags & LR_DIR_DONE)
                continue;
            /* LR_MOVED (budget used, nothing held) is queued for another turn
             * already; keeping EPOLLIN avoids a DEL and an ADD per budget. */
            if ((pr->wait[j] == LR_WAIT_IN || pr->wait[j] == LR_MOVED) &&
                pr->dir[j].in_fd == e->fd)
                want |= EPOLLIN;
            if (pr->wait[j] == LR_WAIT_OUT && pr->dir[j].out_fd == e->fd)
                want |= EPOLLOUT;
        }
        if (!e->pollable) {
            if (want)
                schedule(p, pr, 3);
            continue;
        }
        if (want == e->registered)
            continue;
        ev.events = want;
        ev.data.ptr = e;
        if (want == 0) {
            /* Out of the set, not just masked: EPOLLHUP cannot be masked and
             * would wake us for ever on a finished fd. */
            (void)epoll_ctl(p->epfd, EPOLL_CTL_DEL, e->fd, NULL);
        } else if (epoll_ctl(p->epfd, e->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD,
                             e->fd, &ev) < 0) {
            if (errno != EPERM)
                return -errno;
            e->pollable = 0; /* a regular file: always ready */
            schedule(p, pr, 3);
            continue;
        }
        e->registered = want;
    }
    /* A finished direction whose out fd is not a socket (a pipe, a tty, a file)
     * signals EOF by closing it, unless the other direction reads from it. */
    for (j = 0; j < 2; j++) {
        int fd = pr->dir[j].out_fd;
        if (!(pr->dir[j].flags & LR_DIR_DONE) || fd < 0 || (pr->dir[j].flags & LR_DIR_OUT_SOCKET))
            continue;
        if (pr->dir[1 - j].in_fd == fd && !(pr->dir[1 - j].flags & LR_DIR_DONE))
            continue;
        for (i = 0; i < pr->nep; i++) {
            if (pr->ep[i].fd == fd) {
                if (pr->ep[i].registered)
                    (void)epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
                pr->ep[i].registered = 0;
                close(fd);
                pr->ep[i].fd = -1;
            }
        }
        pr->dir[j].out_fd = -1;
        if (pr->dir[1 - j].in_fd == fd)
            pr->dir[1 - j].in_fd = -1;
    }
    return 0;
}

static void serve(struct lr_pump *p, struct lr_pair *pr)
{
    int i, rc;
    unsigned int runnable = pr->runnable;

    pr->runnable = 0;
    for (i = 0; i < 2; i++) {
        struct lr_dir *d = &pr->dir[i];
        uint64_t moved = 0, before = d->syscalls;

        if (!(runnable & (1u << i)) || (d->flags & LR_DIR_DONE))
            continue;
        rc = lr_move(d, &p->pool, p->budget, &moved);
        STAT_ADD(p, turns, 1);
        STAT_ADD(p, syscalls, d->syscalls - before);
        STAT_ADD(p, bytes, moved);
        __atomic_store_n(&pr->seen[i], d->moved, __ATOMIC_RELAXED);
        if (rc < 0) {
            end_pair(p, pr, -rc, d->err_side == LR_SIDE_IN ? i : 1 - i, 0);
            return;
        }
        pr->wait[i] = rc;
        if (rc == LR_MOVED)
            schedule(p, pr, 1u << i);
    }
    if ((pr->dir[0].flags & LR_DIR_DONE) && (pr->dir[1].flags & LR_DIR_DONE)) {
        end_pair(p, pr, 0, -1, 0);
        return;
    }
    rc = update_interest(p, pr);
    if (rc < 0)
        end_pair(p, pr, -rc, -1, 0);
}

static int socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;

    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return 0;
    return err;
}

static void take_commands(struct lr_pump *p, int *stop)
{
    struct lr_pair *adds, *pr, *aborting[64];
    int i, n = 0, more;

    do {
        pthread_mutex_lock(&p->lock);
        *stop = p->stop;
        adds = p->adds;
        p->adds = NULL;
        p->adds_tail = &p->adds;
        n = 0;
        while (p->naborts > 0 && n < 64) {
            int64_t id = p->aborts[--p->naborts];
            int slot = (int)(id & ID_SLOT_MASK);
            pr = slot < p->nslots ? p->slots[slot] : NULL;
            /* Unpublished pairs are only freed after this thread publishes them. */
            if (pr != NULL && pr->id == id && !pr->published)
                aborting[n++] = pr;
        }
        more = p->naborts > 0;
        pthread_mutex_unlock(&p->lock);

        while (adds != NULL) {
            pr = adds;
            adds = adds->next;
            pr->next = NULL;
            schedule(p, pr, 3);
        }
        for (i = 0; i < n; i++)
            end_pair(p, aborting[i], ECANCELED, -1, LR_END_ABORTED);
    } while (more);
}

/* Hand ended pairs to the reaper.  One still on the turn list stays until the
 * next round has taken it off: the reaper frees what it is given. */
static void publish(struct lr_pump *p)
{
    struct lr_pair *pr, *keep = NULL;
    int published = 0;

    if (p->ended == NULL)
        return;
    pthread_mutex_lock(&p->lock);
    while (p->ended != NULL) {
        pr = p->ended;
        p->ended = pr->next;
        if (pr->queued) {
            pr->next = keep;
            keep = pr;
            continue;
        }
        pr->next = NULL;
        pr->published = 1;
        *p->done_tail = pr;
        p->done_tail = &pr->next;
        published++;
    }
    pthread_mutex_unlock(&p->lock);
    p->ended = keep;
    if (published)
        wake(p->notifyfd);
}

static void *pump_main(void *arg)
{
    struct lr_pump *p = arg;
    struct epoll_event evs[MAX_EVENTS];
    int stop = 0;

    while (!stop) {
        int i, j, n = epoll_wait(p->epfd, evs, MAX_EVENTS, p->turns != NULL ? 0 : -1);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (n > 0)
            STAT_ADD(p, wakeups, 1);
        for (i = 0; i < n; i++) {
            struct lr_ep *e = evs[i].data.ptr;
            struct lr_pair *pr;
            uint32_t ev = evs[i].events;
            unsigned int dirs = 0;

            if (e == NULL) {
                drain(p->wakefd);
                take_commands(p, &stop);
                continue;
            }
            pr = e->pair;
            if (pr->ended || e->fd < 0)
                continue;
            if ((ev & EPOLLERR) && e->is_socket) {
                int err = socket_error(e->fd);
                if (err != 0) {
                    int side = (e->fd == pr->dir[0].in_fd || e->fd == pr->dir[1].out_fd) ? 0 : 1;
                    end_pair(p, pr, err, side, 0);
                    continue;
                }
            }
            for (j = 0; j < 2; j++) {
                if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && pr->dir[j].in_fd == e->fd)
                    dirs |= 1u << j;
                if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && pr->dir[j].out_fd == e->fd)
                    dirs |= 1u << j;
            }
            schedule(p, pr, dirs);
        }
        /* Serve this round's pairs; a pair that used its budget queues itself
         * again for the next round, after the others have had their turn. */
        {
            struct lr_pair *round = p->turns;
            p->turns = NULL;
            while (round != NULL) {
                struct lr_pair *pr = round;
                round = round->next_turn;
                pr->next_turn = NULL;
                pr->queued = 0;
                if (!pr->ended)
                    serve(p, pr);
            }
        }
        publish(p);
    }
    return NULL;
}

/* ------------------------------------------------------------------------- */
/* the pump's API */

lr_pump *lr_pump_new(const struct lr_pump_config *config, int *err)
{
    struct lr_pump *p;
    struct epoll_event ev;
    sigset_t all, old;
    int rc;

    p = calloc(1, sizeof *p);
    if (p == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    p->epfd = p->wakefd = p->notifyfd = -1;
    p->budget = config->budget > 0 ? config->budget : (uint64_t)1 << 20;
    p->dir_flags = config->dir_flags & (LR_DIR_COPY | LR_DIR_SHORT_WAITS);
    p->adds_tail = &p->adds;
    p->done_tail = &p->done;
    rc = lr_pool_init(&p->pool, config->max_pipes, config->max_idle_pipes, config->pipe_size);
    if (rc < 0)
        goto fail;
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        rc = -ENOMEM;
        goto fail_pool;
    }
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->notifyfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->epfd < 0 || p->wakefd < 0 || p->notifyfd < 0) {
        rc = -errno;
        goto fail_fds;
    }
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->wakefd, &ev) < 0) {
        rc = -errno;
        goto fail_fds;
    }
    /* Signals are for the interpreter's thread, never this one. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = -pthread_create(&p->thread, NULL, pump_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc < 0)
        goto fail_fds;
    return p;

fail_fds:
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->wakefd >= 0)
        close(p->wakefd);
    if (p->notifyfd >= 0)
        close(p->notifyfd);
    pthread_mutex_destroy(&p->lock);
fail_pool:
    lr_pool_destroy(&p->pool);
fail:
    free(p);
    *err = -rc;
    return NULL;
}

int lr_pump_notify_fd(lr_pump *p)
{
    return p->notifyfd;
}

static int add_ep(struct lr_pair *pr, int fd)
{
    struct stat st;
    int i, fl;

    for (i = 0; i < pr->nep; i++)
        if (pr->ep[i].fd == fd)
            return 0;
    if (fstat(fd, &st) < 0)
        return -errno;
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0))
        return -errno;
    pr->ep[pr->nep].fd = fd;
    pr->ep[pr->nep].is_socket = S_ISSOCK(st.st_mode);
    pr->ep[pr->nep].is_pipe = S_ISFIFO(st.st_mode);
    pr->ep[pr->nep].pollable = !S_ISREG(st.st_mode);
    pr->ep[pr->nep].pair = pr;
    pr->nep++;
    return 0;
}

static int ep_is_socket(struct lr_pair *pr, int fd)
{
    int i;
    for (i = 0; i < pr->nep; i++)
        if (pr->ep[i].fd == fd)
            return pr->ep[i].is_socket;
    return 0;
}

static int ep_is_pipe(struct lr_pair *pr, int fd)
{
    int i;
    for (i = 0; i < pr->nep; i++)
        if (pr->ep[i].fd == fd)
            return pr->ep[i].is_pipe;
    return 0;
}

static int ep_is_file(struct lr_pair *pr, int fd)
{
    int i;
    for (i = 0; i < pr->nep; i++)
        if (pr->ep[i].fd == fd)
            return !pr->ep[i].pollable;
    return 0;
}

static int64_t take_slot(struct lr_pump *p, struct lr_pair *pr)
{
    int i, slot = -1;

    for (i = 0; i < p->nslots; i++) {
        int s = (p->free_hint + i) % p->nslots;
        if (p->slots[s] == NULL) {
            slot = s;
            break;
        }
    }
    if (slot < 0) {
        int grown = p->nslots ? p->nslots * 2 : 64;
        struct lr_pair **slots;
        uint32_t *gens;
        if (grown > ID_SLOT_MASK + 1)
            return -EMFILE;
        slots = realloc(p->slots, (size_t)grown * sizeof *slots);
        if (slots == NULL)
            return -ENOMEM;
        p->slots = slots;
        gens = realloc(p->gens, (size_t)grown * sizeof *gens);
        if (gens == NULL)
            return -ENOMEM;
        p->gens = gens;
        for (i = p->nslots; i < grown; i++) {
            p->slots[i] = NULL;
            p->gens[i] = 0;
        }
        slot = p->nslots;
        p->nslots = grown;
    }
    p->gens[slot] = (p->gens[slot] + 1) & 0x7fffffff;
    p->slots[slot] = pr;
    p->free_hint = (slot + 1) % p->nslots;
    return ((int64_t)p->gens[slot] << ID_SLOT_BITS) | slot;
}

int64_t lr_pump_add(lr_pump *p, int a_rfd, int a_wfd, int b_rfd, int b_wfd,
                    const unsigned char *ab_prefix, size_t ab_len,
                    const unsigned char *ba_prefix, size_t ba_len)
{
    struct lr_pair *pr;
    int fds[4] = {a_rfd, a_wfd, b_rfd, b_wfd};
    int i, rc;
    int64_t id;

    for (i = 0; i < 4; i++)
        if (fds[i] < 0)
            return -EBADF;
    pr = calloc(1, sizeof *pr);
    if (pr == NULL)
        return -ENOMEM;
    for (i = 0; i < 4; i++) {
        rc = add_ep(pr, fds[i]);
        if (rc < 0)
            goto fail;
    }
    for (i = 0; i < 2; i++) {
        struct lr_dir *d = &pr->dir[i];
        d->in_fd = i == 0 ? a_rfd : b_rfd;
        d->out_fd = i == 0 ? b_wfd : a_wfd;
        d->pipe_r = d->pipe_w = -1;
        d->flags = p->dir_flags;
        if (ep_is_socket(pr, d->out_fd))
            d->flags |= LR_DIR_OUT_SOCKET;
        if (ep_is_file(pr, d->in_fd))
            d->flags |= LR_DIR_IN_FILE;
        else if (ep_is_pipe(pr, d->in_fd) && ep_is_socket(pr, d->out_fd))
            d->flags |= LR_DIR_DIRECT | LR_DIR_IN_PIPE;
        else if (ep_is_socket(pr, d->in_fd) && ep_is_pipe(pr, d->out_fd))
            d->flags |= LR_DIR_DIRECT;
    }
    rc = lr_dir_prefix(&pr->dir[0], ab_prefix, ab_prefix != NULL ? ab_len : 0);
    if (rc == 0)
        rc = lr_dir_prefix(&pr->dir[1], ba_prefix, ba_prefix != NULL ? ba_len : 0);
    if (rc < 0)
        goto fail;
    pr->side = -1;

    pthread_mutex_lock(&p->lock);
    id = take_slot(p, pr);
    if (id >= 0) {
        pr->id = id;
        *p->adds_tail = pr;
        p->adds_tail = &pr->next;
    }
    pthread_mutex_unlock(&p->lock);
    if (id < 0) {
        rc = (int)id;
        goto fail;
    }
    STAT_ADD(p, pairs_total, 1);
    STAT_ADD(p, pairs_active, 1);
    wake(p->wakefd);
    return id;

fail:
    free(pr->dir[0].buf);
    free(pr->dir[1].buf);
    free(pr);
    return rc;
}

int lr_pump_abort(lr_pump *p, int64_t id)
{
    int slot = (int)(id & ID_SLOT_MASK), rc = -ENOENT;

    pthread_mutex_lock(&p->lock);
    if (id >= 0 && slot < p->nslots && p->slots[slot] != NULL && p->slots[slot]->id == id &&
        !p->slots[slot]->published) {
        if (p->naborts == p->cap_aborts) {
            int grown = p->cap_aborts ? p->cap_aborts * 2 : 16;
            int64_t *aborts = realloc(p->aborts, (size_t)grown * sizeof *aborts);
            if (aborts == NULL) {
                pthread_mutex_unlock(&p->lock);
                return -ENOMEM;
            }
            p->aborts = aborts;
            p->cap_aborts = grown;
        }
        p->aborts[p->naborts++] = id;
        rc = 0;
    }
    pthread_mutex_unlock(&p->lock);
    if (rc == 0)
        wake(p->wakefd);
    return rc;
}

int lr_pump_pair_bytes(lr_pump *p, int64_t id, uint64_t *a_to_b, uint64_t *b_to_a)
{
    int slot = (int)(id & ID_SLOT_MASK), rc = -ENOENT;

    pthread_mutex_lock(&p->lock);
    if (id >= 0 && slot < p->nslots && p->slots[slot] != NULL && p->slots[slot]->id == id) {
        *a_to_b = __atomic_load_n(&p->slots[slot]->seen[0], __ATOMIC_RELAXED);
        *b_to_a = __atomic_load_n(&p->slots[slot]->seen[1], __ATOMIC_RELAXED);
        rc = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

static void fill_end(struct lr_pair_end *out, const struct lr_pair *pr)
{
    out->id = pr->id;
    out->a_to_b = pr->dir[0].moved;
    out->b_to_a = pr->dir[1].moved;
    out->err = pr->err;
    out->side = pr->err != 0 ? pr->side : -1;
    out->flags = pr->end_flags;
}

int lr_pump_reap(lr_pump *p, struct lr_pair_end *out, int max)
{
    struct lr_pair *pr;
    int n = 0;

    drain(p->notifyfd); /* before taking the list: a later end wakes us again */
    pthread_mutex_lock(&p->lock);
    while (n < max && p->done != NULL) {
        pr = p->done;
        p->done = pr->next;
        if (p->done == NULL)
            p->done_tail = &p->done;
        fill_end(&out[n++], pr);
        p->slots[pr->id & ID_SLOT_MASK] = NULL;
        free(pr);
    }
    if (p->done != NULL)
        wake(p->notifyfd);
    pthread_mutex_unlock(&p->lock);
    return n;
}

void lr_pump_get_stats(lr_pump *p, struct lr_pump_stats *s)
{
    s->wakeups = STAT_GET(p, wakeups);
    s->turns = STAT_GET(p, turns);
    s->syscalls = STAT_GET(p, syscalls);
    s->bytes = STAT_GET(p, bytes);
    s->pairs_total = STAT_GET(p, pairs_total);
    s->pairs_active = STAT_GET(p, pairs_active);
    s->fell_back = STAT_GET(p, fell_back);
    /* The pool belongs to the pump thread; these two are a racy glimpse. */
    s->pipes_total = __atomic_load_n(&p->pool.total, __ATOMIC_RELAXED);
    s->pipes_idle = __atomic_load_n(&p->pool.idle, __ATOMIC_RELAXED);
    s->pipe_size = __atomic_load_n(&p->pool.actual_size, __ATOMIC_RELAXED);
}

void lr_pump_free(lr_pump *p)
{
    int i;

    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_mutex_unlock(&p->lock);
    wake(p->wakefd);
    pthread_join(p->thread, NULL);

    /* The thread is gone: everything below is single-threaded. */
    for (i = 0; i < p->nslots; i++) {
        struct lr_pair *pr = p->slots[i];
        if (pr == NULL)
            continue;
        if (!pr->ended)
            end_pair(p, pr, ECANCELED, -1, LR_END_ABORTED);
        free(pr);
    }
    free(p->slots);
    free(p->gens);
    free(p->aborts);
    close(p->epfd);
    close(p->wakefd);
    close(p->notifyfd);
    lr_pool_destroy(&p->pool);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
