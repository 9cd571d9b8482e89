/* labrelay's native data path: the capped pipe pool.
 *
 * Pipes of one size, reused while empty, at most max_total open: past the cap a
 * direction copies through a buffer instead (mover.c).  Used by one thread at a
 * time (the pump thread, or a test).  See relay_splice.h for the contract. */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lr_internal.h"

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
int lr_pool_get(struct lr_pool *pool, int *r, int *w)
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
void lr_pool_put(struct lr_pool *pool, int r, int w, int empty)
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
