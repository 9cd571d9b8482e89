/* labrelay's native data path: the pump thread.
 *
 * One thread with its own epoll set serves spliced pairs: it runs lr_move() on a
 * direction when the kernel says its fd is ready, a byte budget per turn for
 * fairness, and hands ended pairs to the reaper (pump_api.c) through an eventfd.
 * No Python C API.  See relay_splice.h for the contract. */

#define _GNU_SOURCE

#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lr_bulk.h"
#include "lr_internal.h"

void lr_wake(int fd)
{
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof one);
    (void)ignored;
}

void lr_drain(int fd)
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

void lr_end_pair(struct lr_pump *p, struct lr_pair *pr, int err, int side, unsigned int flags)
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
            if ((pr->dir[j].flags & LR_DIR_DONE) || (pr->paused & (1u << j)))
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

static void serve(struct lr_pump *p, struct lr_pair *pr, uint64_t now)
{
    int i, rc;
    unsigned int runnable = pr->runnable;
    uint64_t served = 0;

    pr->runnable = 0;
    for (i = 0; i < 2; i++) {
        struct lr_dir *d = &pr->dir[i];
        uint64_t moved = 0, before = d->syscalls;

        if (!(runnable & (1u << i)) || (d->flags & LR_DIR_DONE) || (pr->paused & (1u << i)))
            continue;
        rc = lr_move(d, &p->pool, p->budget, &moved);
        STAT_ADD(p, turns, 1);
        STAT_ADD(p, syscalls, d->syscalls - before);
        STAT_ADD(p, bytes, moved);
        served += moved;
        __atomic_store_n(&pr->seen[i], d->moved, __ATOMIC_RELAXED);
        if (rc < 0) {
            lr_end_pair(p, pr, -rc, d->err_side == LR_SIDE_IN ? i : 1 - i, 0);
            return;
        }
        pr->wait[i] = rc;
        if (rc == LR_MOVED)
            schedule(p, pr, 1u << i);
    }
    if (lr_rate_add(&pr->rate, now, served))
        p->interactive_at = now; /* lr_bulk.h: not SCHED_BATCH beside this pair */
    if ((pr->dir[0].flags & LR_DIR_DONE) && (pr->dir[1].flags & LR_DIR_DONE)) {
        lr_end_pair(p, pr, 0, -1, 0);
        return;
    }
    rc = update_interest(p, pr);
    if (rc < 0)
        lr_end_pair(p, pr, -rc, -1, 0);
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
    struct lr_pause_cmd pausing[64];
    int i, n = 0, np = 0, more;

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
        np = 0;
        while (p->npauses > 0 && np < 64)
            pausing[np++] = p->pauses[--p->npauses];
        more = p->naborts > 0 || p->npauses > 0;
        pthread_mutex_unlock(&p->lock);

        while (adds != NULL) {
            pr = adds;
            adds = adds->next;
            pr->next = NULL;
            schedule(p, pr, 3);
        }
        for (i = 0; i < n; i++)
            lr_end_pair(p, aborting[i], ECANCELED, -1, LR_END_ABORTED);
        /* pausing[] is oldest first: the newest command for a pair wins. */
        for (i = 0; i < np; i++) {
            int slot = (int)(pausing[i].id & ID_SLOT_MASK);
            pr = slot < p->nslots ? p->slots[slot] : NULL;
            if (pr == NULL || pr->id != pausing[i].id || pr->published || pr->ended)
                continue;
            {
                unsigned int resumed = pr->paused & ~pausing[i].dirs;
                pr->paused = pausing[i].dirs & 3u;
                if (resumed)
                    schedule(p, pr, resumed);
                else if (update_interest(p, pr) < 0)
                    lr_end_pair(p, pr, EIO, -1, 0);
            }
        }
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
        lr_wake(p->notifyfd);
}

void *lr_pump_main(void *arg)
{
    struct lr_pump *p = arg;
    struct epoll_event evs[MAX_EVENTS];
    struct lr_bulk bulk;
    int stop = 0;

    lr_bulk_init(&bulk, lr_now_ms());
    while (!stop) {
        /* SCHED_BATCH while bulk flows (lr_bulk.h); a pause ends it, so a thread that is
         * batch never sleeps longer than that without looking */
        int timeout = p->turns != NULL ? 0 : (bulk.batch ? LR_QUIET_MS : -1);
        int i, j, n = epoll_wait(p->epfd, evs, MAX_EVENTS, timeout);

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
                lr_drain(p->wakefd);
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
                    lr_end_pair(p, pr, err, side, 0);
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
        uint64_t now = lr_now_ms();
        {
            struct lr_pair *round = p->turns;
            p->turns = NULL;
            while (round != NULL) {
                struct lr_pair *pr = round;
                round = round->next_turn;
                pr->next_turn = NULL;
                pr->queued = 0;
                if (!pr->ended)
                    serve(p, pr, now);
            }
        }
        publish(p);
        uint64_t total = STAT_GET(p, bytes); /* what it reads it moves: one total */
        int interactive = p->interactive_at != 0 && now - p->interactive_at < LR_INTERACTIVE_MS;
        if (lr_bulk_update(&bulk, now, total, total, interactive))
            STAT_ADD(p, batched, 1);
    }
    return NULL;
}
