/* labrelay's native data path: what its .c files share and Python does not see.
 *
 * Private: not given to cffi (the public contract is relay_splice.h, which is also
 * the cdef, so it holds no struct cffi need not know).  Here are the pipe pool's
 * get/put (pool.c, used by mover.c) and the pump's pair and thread state (the
 * thread is pump.c, the API the interpreter calls is pump_api.c).
 */
#ifndef LR_INTERNAL_H
#define LR_INTERNAL_H

#ifndef __linux__
#error "labrelay's native data path needs Linux (splice, epoll, eventfd)"
#endif

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "lr_bulk.h"
#include "relay_splice.h"

/* Shared between this module's files, not exported from the extension. */
#define LR_HIDDEN __attribute__((visibility("hidden")))

/* ---- the pipe pool (pool.c) ---- */

/* An empty pipe, or -ENOBUFS at the cap (the caller copies instead), or -errno. */
LR_HIDDEN int lr_pool_get(struct lr_pool *pool, int *r, int *w);
/* Only an empty pipe may be reused: one that still holds bytes is closed. */
LR_HIDDEN void lr_pool_put(struct lr_pool *pool, int r, int w, int empty);

/* ---- the pump (pump.c: the thread; pump_api.c: the caller's side) ---- */

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
    unsigned int paused;   /* bit i: dir[i] is paused (lr_pump_pause) */
    struct lr_ep ep[4];
    int nep;
    int ended, published, queued;
    int err, side;
    unsigned int end_flags;
    uint64_t seen[2];      /* dir[i].moved, published for other threads */
    struct lr_rate rate;   /* its bytes in the last two spans (lr_bulk.h) */
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
    uint64_t interactive_at; /* lr_now_ms() it last served an interactive pair, or 0 */

    /* shared, under lock */
    pthread_mutex_t lock;
    int stop;
    struct lr_pair *adds, **adds_tail;
    int64_t *aborts;
    int naborts, cap_aborts;
    struct lr_pause_cmd { int64_t id; unsigned int dirs; } *pauses;
    int npauses, cap_pauses;
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

/* Add one to an eventfd (wakes its reader). */
LR_HIDDEN void lr_wake(int fd);
/* Reset an eventfd to zero. */
LR_HIDDEN void lr_drain(int fd);
/* End a pair on the pump thread (or after it stopped): close its fds (resetting
 * sockets when err != 0), give back its pipes, put it on the ended list. */
LR_HIDDEN void lr_end_pair(struct lr_pump *p, struct lr_pair *pr, int err, int side,
                           unsigned int flags);
/* The pump thread's body (pthread_create's start routine). */
LR_HIDDEN void *lr_pump_main(void *arg);

#endif /* LR_INTERNAL_H */
