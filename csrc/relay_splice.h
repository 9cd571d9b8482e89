/* labrelay's native data path: move bytes between file descriptors in the kernel.
 *
 * This file is both the C header and the cffi cdef (relay/datapath/_splice_build.py
 * reads it verbatim), so it holds declarations and integer #defines only: no
 * #include, no include guard, no other macros.  Include <stddef.h> and <stdint.h>
 * first.  docs/datapath.md explains the design and the figures behind it.
 *
 * The code, one file per job: pool.c (the capped pipe pool), mover.c (lr_move and
 * struct lr_dir's helpers), pump.c (the pump thread), pump_api.c (lr_pump_*, called
 * from the interpreter's thread).  What they share and cffi must not see is in
 * lr_internal.h.
 *
 * Two layers:
 *
 * lr_move()  moves bytes in one direction, in_fd -> pipe -> out_fd with splice(2)
 *            (or file -> out_fd with sendfile(2), or read(2)/write(2) through a
 *            small buffer where splice is refused), as much as the kernel allows,
 *            and says why it stopped.  It keeps no state of its own: everything is
 *            in the caller's struct lr_dir and struct lr_pool.
 *
 * lr_pump_*  a pump thread with its own epoll set that owns spliced pairs (two
 *            full-duplex ends) and runs lr_move on them when the kernel says an fd
 *            is ready.  The caller hears from it only when a pair ends, through an
 *            eventfd (lr_pump_notify_fd) and lr_pump_reap().  No Python C API.
 */

/* lr_move results (negative values are -errno) */
#define LR_MOVED 1      /* the byte budget is used up; call again */
#define LR_WAIT_IN 2    /* nothing held, in_fd has nothing to read: wait until readable */
#define LR_WAIT_OUT 3   /* bytes held, out_fd is full: wait until writable */
#define LR_DONE 4       /* in_fd gave EOF, everything held was delivered, out_fd shut */

/* struct lr_dir.flags: set by the caller */
#define LR_DIR_OUT_SOCKET 0x01  /* at EOF, shutdown(out_fd, SHUT_WR) */
#define LR_DIR_OUT_CLOSE 0x02   /* at EOF, close(out_fd) and set it to -1 */
#define LR_DIR_IN_FILE 0x04     /* in_fd is a regular file: sendfile(2) it */
#define LR_DIR_COPY 0x08        /* use read/write through a buffer, not splice */
#define LR_DIR_SHORT_WAITS 0x10 /* a short read ends the call (the caller polls level-triggered) */
#define LR_DIR_DIRECT 0x20      /* in_fd or out_fd is a pipe: splice straight across, no pipe of ours */
#define LR_DIR_IN_PIPE 0x40     /* (with LR_DIR_DIRECT) in_fd is the pipe, out_fd the socket */
/* struct lr_dir.flags: set by lr_move */
#define LR_DIR_EOF 0x100        /* in_fd gave EOF */
#define LR_DIR_DONE 0x200       /* out_fd was shut: nothing more will move */
#define LR_DIR_FELL_BACK 0x400  /* splice/sendfile was refused (EINVAL/ENOSYS): now copying */

/* struct lr_dir.err_side after a negative result */
#define LR_SIDE_IN 1
#define LR_SIDE_OUT 2

/* struct lr_pair_end.flags */
#define LR_END_ABORTED 0x01     /* ended by lr_pump_abort() or lr_pump_free() */
#define LR_END_FELL_BACK 0x02   /* some of it was copied, not spliced */

#define LR_COPY_BUF_SIZE 65536

/* A capped pool of pipes, all of the same size.  Used by one thread at a time. */
struct lr_pool {
    int *fds;             /* idle pipes: fds[2*i] read end, fds[2*i+1] write end */
    int idle;             /* idle pipes in fds */
    int max_idle;         /* idle pipes kept; more are closed when returned */
    int total;            /* pipes open (idle + in use) */
    int max_total;        /* cap on total: beyond it a direction copies instead */
    int pipe_size;        /* requested with F_SETPIPE_SZ (0: the kernel default) */
    int actual_size;      /* what the last new pipe got */
};

/* One direction of a pair.  Zero it, set in_fd, out_fd and flags, pipe_r = pipe_w = -1. */
struct lr_dir {
    int in_fd;
    int out_fd;
    int pipe_r;           /* the pipe, held only while it holds bytes; else -1 */
    int pipe_w;
    unsigned int flags;
    int err_side;         /* LR_SIDE_* after a negative result */
    uint64_t pipe_held;   /* bytes in the pipe */
    uint64_t moved;       /* bytes written to out_fd, in all */
    uint64_t syscalls;    /* moving calls made (splice, sendfile, read, write) */
    unsigned char *buf;   /* copy buffer (and prefix), malloc'd; NULL when empty */
    size_t buf_off;
    size_t buf_len;
    size_t buf_cap;
};

int lr_pool_init(struct lr_pool *pool, int max_total, int max_idle, int pipe_size);
void lr_pool_destroy(struct lr_pool *pool);

/* Queue bytes to be written to out_fd before anything read from in_fd. */
int lr_dir_prefix(struct lr_dir *dir, const unsigned char *data, size_t len);
/* Move bytes until would-block, EOF or `budget` bytes; adds the bytes written to *moved. */
int lr_move(struct lr_dir *dir, struct lr_pool *pool, uint64_t budget, uint64_t *moved);
/* Give back the pipe (closed if it still holds bytes) and the buffer. */
void lr_dir_release(struct lr_dir *dir, struct lr_pool *pool);

/* ---- the pump thread ---- */

typedef struct lr_pump lr_pump;

struct lr_pump_config {
    int pipe_size;        /* bytes per pipe (F_SETPIPE_SZ); 0: kernel default */
    int max_pipes;        /* pipes open at most */
    int max_idle_pipes;   /* idle pipes kept */
    uint64_t budget;      /* bytes per direction per turn, for fairness between pairs */
    unsigned int dir_flags; /* LR_DIR_COPY and/or LR_DIR_SHORT_WAITS, for every direction */
};

struct lr_pair_end {
    int64_t id;
    uint64_t a_to_b;
    uint64_t b_to_a;
    int err;              /* 0: both directions ended cleanly; else an errno */
    int side;             /* 0: the error came from side a, 1: side b, -1: none */
    unsigned int flags;   /* LR_END_* */
};

struct lr_pump_stats {
    uint64_t wakeups;     /* epoll_wait returns with something to do */
    uint64_t turns;       /* lr_move calls */
    uint64_t syscalls;    /* moving syscalls */
    uint64_t bytes;       /* bytes delivered, all pairs */
    uint64_t pairs_total;
    uint64_t pairs_active;
    uint64_t fell_back;   /* pairs that copied some bytes */
    uint64_t batched;     /* times the thread turned SCHED_BATCH for bulk (lr_bulk.h) */
    int pipes_total;
    int pipes_idle;
    int pipe_size;
};

/* Start a pump thread; NULL with *err set (an errno) on failure. */
lr_pump *lr_pump_new(const struct lr_pump_config *config, int *err);
/* Readable when pairs have ended: then call lr_pump_reap. */
int lr_pump_notify_fd(lr_pump *pump);
/* Hand a pair to the pump, which owns the fds from now on (and closes them).  Side a
 * reads a_rfd and writes a_wfd (the same fd for a socket); likewise b.  ab_prefix is
 * sent to b before anything read from a; ba_prefix to a.  Returns the pair's id (>= 0)
 * or -errno (then the fds are still the caller's). */
int64_t lr_pump_add(lr_pump *pump, int a_rfd, int a_wfd, int b_rfd, int b_wfd,
                    const unsigned char *ab_prefix, size_t ab_len,
                    const unsigned char *ba_prefix, size_t ba_len);
/* Reset both ends of a live pair now; it ends with err ECANCELED.  0 or -ENOENT. */
int lr_pump_abort(lr_pump *pump, int64_t id);
/* Pause the directions of a live pair in `dirs` (bit 0: a -> b, bit 1: b -> a) and
 * resume the others: a paused direction reads nothing more (what it holds waits).
 * For per-user rate limits.  0 or -ENOENT (or -ENOMEM). */
int lr_pump_pause(lr_pump *pump, int64_t id, unsigned int dirs);
/* Bytes moved so far by a pair that has not been reaped.  0 or -ENOENT. */
int lr_pump_pair_bytes(lr_pump *pump, int64_t id, uint64_t *a_to_b, uint64_t *b_to_a);
/* Take up to `max` ended pairs (their ids become free).  Returns how many. */
int lr_pump_reap(lr_pump *pump, struct lr_pair_end *out, int max);
void lr_pump_get_stats(lr_pump *pump, struct lr_pump_stats *stats);
/* Stop the thread, reset and close every pair it still owns, free everything. */
void lr_pump_free(lr_pump *pump);
