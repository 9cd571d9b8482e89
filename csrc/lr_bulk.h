/* Bulk detection for labrelay's data-path threads: while a thread moves bulk it runs
 * SCHED_BATCH, which does not preempt the task running where it is woken, so by the
 * time it runs the sender has mostly written again and one wake-up carries several
 * writes (fewer wake-ups, sleeps and syscalls per GiB: docs/performance.md).  A thread
 * that moves little stays SCHED_OTHER, so a lone keystroke wakes it as before; once the
 * bytes pause for LR_QUIET_MS it is SCHED_OTHER again.  Used by the splice pump
 * (pump.c, every spliced pair's thread) and the pooled -J thread (gpump.c).
 * Private to csrc/; header-only (static inline); no Python C API. */

#ifndef LR_BULK_H
#define LR_BULK_H

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

#define LR_QUIET_MS 20                 /* bytes paused this long: SCHED_OTHER again */
#define LR_BULK_MS 20                  /* the span over which bulk is judged */
#define LR_BULK_BYTES (1024 * 1024)    /* moved in a span: bulk (about 50 MB/s) */

/* A thread that serves several sessions (the splice pump: every spliced pair of the
 * process) must not make one user's keystrokes wait behind another's bulk: a woken
 * SCHED_BATCH thread does not preempt the task running where it wakes, so with the
 * CPUs busy with bulk sessions a keystroke waited for the running task's slice
 * (bench/jecho.py, fast path beside four bulk sessions: p50 2.9-3.4 ms against
 * 0.9-1.9 ms without batch, p99 19-22 ms against 17-19).  So such a thread stays, or
 * turns at once, SCHED_OTHER while it serves an interactive session: one that moved at
 * most LR_SMALL_BYTES over its current and previous LR_BULK_MS spans, served within
 * the last LR_INTERACTIVE_MS (with this rule: p50 1.2-2.7 ms, p99 16-19, as without
 * batch).  Bulk sessions never look like that (a bulk stream's small reverse direction
 * counts with its own bytes); a new session does while its handshake runs, which only
 * delays batch by LR_INTERACTIVE_MS. */
#define LR_SMALL_BYTES (16 * 1024)
#define LR_INTERACTIVE_MS 1000

static inline uint64_t lr_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* SCHED_BATCH (bulk) or SCHED_OTHER for the calling thread; 0, or an errno (a
 * sandbox may refuse: the thread then stays as it is). */
static inline int lr_set_batch(int on)
{
    struct sched_param sp = {0};
    return pthread_setschedparam(pthread_self(), on ? SCHED_BATCH : SCHED_OTHER, &sp);
}

/* One thread's bulk state.  Two running totals, because the pooled -J thread reads
 * wire bytes and hands on channel bytes: the pause is judged on the bytes it handed on
 * (``moved``), bulk on the bytes it read (``got``); the splice pump moves what it reads
 * and passes its one total as both. */
struct lr_bulk {
    uint64_t span_start, span_from; /* the current span: when, and ``got`` then */
    uint64_t last_move, last_total; /* when ``moved`` last grew, and to what */
    int batch;                      /* the thread is SCHED_BATCH now */
    int can;                        /* 0 once the system refused SCHED_BATCH */
};

/* ``now``: lr_now_ms(), the caller's, so its own timers use the same instant. */
static inline void lr_bulk_init(struct lr_bulk *b, uint64_t now)
{
    b->span_start = b->last_move = now;
    b->span_from = b->last_total = 0;
    b->batch = 0;
    b->can = 1;
}

/* One session's rate as the shared thread sees it (LR_SMALL_BYTES above): the bytes it
 * moved in the current and the previous LR_BULK_MS span of the clock. */
struct lr_rate {
    uint64_t span, cur, prev;
};

/* ``moved`` bytes served to one session at ``now``: 1 if that session is interactive. */
static inline int lr_rate_add(struct lr_rate *r, uint64_t now, uint64_t moved)
{
    uint64_t span = now / LR_BULK_MS;

    if (span != r->span) {
        r->prev = span == r->span + 1 ? r->cur : 0;
        r->cur = 0;
        r->span = span;
    }
    r->cur += moved;
    return moved > 0 && r->prev + r->cur <= LR_SMALL_BYTES;
}

/* After a round of work, at ``now`` (lr_now_ms()): ``moved`` is every byte the thread
 * handed on so far, ``got`` every byte it read; ``interactive``: the thread serves an
 * interactive session now (LR_SMALL_BYTES above; 0 for a thread of one session).
 * Switches the calling thread's policy when due; returns 1 when it turned SCHED_BATCH
 * on now. */
static inline int lr_bulk_update(struct lr_bulk *b, uint64_t now, uint64_t moved, uint64_t got,
                                 int interactive)
{
    int turned = 0;

    if (moved != b->last_total) {
        b->last_total = moved;
        b->last_move = now;
    }
    if (b->batch && (interactive || now - b->last_move >= LR_QUIET_MS)) {
        /* the bytes paused, or a keystroke came for a session beside the bulk:
         * SCHED_OTHER again (at once: its answer must not wait either) */
        if (lr_set_batch(0) == 0)
            b->batch = 0;
        b->span_start = now;
        b->span_from = got;
    } else if (now - b->span_start >= LR_BULK_MS) {
        /* bulk: at least LR_BULK_BYTES read per LR_BULK_MS over the span, however long */
        int bulk = !interactive && (got - b->span_from) * LR_BULK_MS >=
                   (uint64_t)LR_BULK_BYTES * (now - b->span_start);
        if (bulk && !b->batch && b->can) {
            if (lr_set_batch(1) == 0) {
                b->batch = 1;
                turned = 1;
            } else {
                b->can = 0;
            }
        } else if (!bulk && b->batch && lr_set_batch(0) == 0) {
            b->batch = 0;
        }
        b->span_start = now;
        b->span_from = got;
    }
    return turned;
}

#endif
