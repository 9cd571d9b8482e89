/* labrelay's native data path: the mover, lr_move(), one direction's bytes.
 *
 * in_fd -> pipe -> out_fd with splice(2), file -> out_fd with sendfile(2), pipe <->
 * socket straight across, or read(2)/write(2) through a buffer where splice is
 * refused; EAGAIN, EINTR, partial writes and bytes held in a pipe are handled here.
 * No state of its own: everything is in the caller's struct lr_dir and struct
 * lr_pool.  See relay_splice.h for the contract. */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lr_internal.h"

#define MAX_CALL ((size_t)1 << 30)
#define SPLICE_FLAGS (SPLICE_F_NONBLOCK | SPLICE_F_MOVE)

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
        if (d->pipe_r >= 0 || lr_pool_get(pool, &d->pipe_r, &d->pipe_w) == 0) {
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
            lr_pool_put(pool, d->pipe_r, d->pipe_w, 1);
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
        lr_pool_put(pool, d->pipe_r, d->pipe_w, d->pipe_held == 0);
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
            lr_pool_put(pool, d->pipe_r, d->pipe_w, 1);
            d->pipe_r = d->pipe_w = -1;
        }
        drop_empty_buf(d);
    }
    *moved_out += moved;
    return rc;
}
