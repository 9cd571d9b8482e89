/* labrelay's native data path: the pump's API, called from the interpreter's thread.
 *
 * Start and stop the pump thread (pump.c), hand it pairs, abort them, read their
 * counters, reap the ended ones.  Shared state is under the pump's lock or atomic.
 * See relay_splice.h for the contract. */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lr_internal.h"

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
    rc = -pthread_create(&p->thread, NULL, lr_pump_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc < 0)
        goto fail_fds;
    pthread_setname_np(p->thread, "lr-pump"); /* seen in top -H, perf, /proc */
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
    lr_wake(p->wakefd);
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
        lr_wake(p->wakefd);
    return rc;
}

int lr_pump_pause(lr_pump *p, int64_t id, unsigned int dirs)
{
    int slot = (int)(id & ID_SLOT_MASK), rc = -ENOENT;

    pthread_mutex_lock(&p->lock);
    if (id >= 0 && slot < p->nslots && p->slots[slot] != NULL && p->slots[slot]->id == id &&
        !p->slots[slot]->published) {
        if (p->npauses == p->cap_pauses) {
            int grown = p->cap_pauses ? p->cap_pauses * 2 : 16;
            struct lr_pause_cmd *pauses = realloc(p->pauses, (size_t)grown * sizeof *pauses);
            if (pauses == NULL) {
                pthread_mutex_unlock(&p->lock);
                return -ENOMEM;
            }
            p->pauses = pauses;
            p->cap_pauses = grown;
        }
        /* Stacked: take_commands applies them oldest first. */
        memmove(p->pauses + 1, p->pauses, (size_t)p->npauses * sizeof *p->pauses);
        p->pauses[0].id = id;
        p->pauses[0].dirs = dirs;
        p->npauses++;
        rc = 0;
    }
    pthread_mutex_unlock(&p->lock);
    if (rc == 0)
        lr_wake(p->wakefd);
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

    lr_drain(p->notifyfd); /* before taking the list: a later end wakes us again */
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
        lr_wake(p->notifyfd);
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
    s->batched = STAT_GET(p, batched);
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
    lr_wake(p->wakefd);
    pthread_join(p->thread, NULL);

    /* The thread is gone: everything below is single-threaded. */
    for (i = 0; i < p->nslots; i++) {
        struct lr_pair *pr = p->slots[i];
        if (pr == NULL)
            continue;
        if (!pr->ended)
            lr_end_pair(p, pr, ECANCELED, -1, LR_END_ABORTED);
        free(pr);
    }
    free(p->slots);
    free(p->gens);
    free(p->aborts);
    free(p->pauses);
    close(p->epfd);
    close(p->wakefd);
    close(p->notifyfd);
    lr_pool_destroy(&p->pool);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
