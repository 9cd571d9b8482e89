/* The open-and-forward thread of a pooled `ssh -J` session (relay_sshopen.h says what
 * and why).  One thread per armed session, under LR_GP_MAX at once: a session's
 * thread only ever blocks in poll() on its two sockets and its control eventfd, so
 * stopping it is one write and one join, and its state (buffers, counters, the
 * sockets' duplicates) belongs to it alone until then.  No Python C API.
 *
 * Its CPU is spent per wake-up far more than per byte: each one is a sleep and a
 * wake in poll(), a recv, and a send whose loopback TCP (the agent's receive, its
 * wake-up) runs in this thread; the AES-GCM is a tenth of it (docs/performance.md).
 * It wakes once per write of the user's ssh, and reads end at a packet's end almost
 * always, so waiting for more bytes (SO_RCVLOWAT) or reading again before poll() finds
 * nothing to batch.  What does batch: while the session moves bulk (LR_BULK_BYTES read
 * either way within an LR_BULK_MS span) the thread is SCHED_BATCH, which does not preempt
 * the task running where it is woken; by the time it runs, the user's ssh has mostly
 * written again and one wake-up carries several packets.  A session that is not bulk
 * stays SCHED_OTHER, so a lone keystroke wakes it as before: the span is judged in the
 * loop when the thread runs anyway (never a timer of its own), and once the bytes
 * pause the quiet report (LR_QUIET_MS) ends the span and the thread is SCHED_OTHER
 * again.  The rule is lr_bulk.h's, shared with the splice pump. */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "lr_bulk.h"
#include "relay_sshopen.h"

#define IN_CAP (512 * 1024)  /* wire bytes read and not yet opened */
#define OUT_CAP (512 * 1024) /* channel bytes opened and not yet written */
/* unreported bytes are reported LR_QUIET_MS after the last ones (lr_bulk.h's pause) */
#define NEWS_MS 500          /* and at least this often while bytes keep flowing */
#define STALL_MS 50          /* hand back when the data connection takes nothing this long */
#define IDLE_MS 2000         /* hand back a session that sent nothing this long (its buffers
                              * and thread are for bulk; Python re-arms on the next data) */
#define LR_GP_CONGESTED LR_GP_FULL
#define RAW_CAP (256 * 1024)  /* bytes read from the data connection, not yet sealed */
#define SEAL_CAP (512 * 1024) /* sealed bytes not yet written to the user */
#define SEAL_ROOM 64          /* a WINDOW_ADJUST packet fits in this */
#define PAD_POOL 512          /* random padding, refilled by getrandom() */
#define MSG_WINDOW_ADJUST 93
#define MSG_DATA 94

static int live; /* threads running, for LR_GP_MAX (atomic) */

struct lr_gpump {
    struct lr_gcm *gcm;
    pthread_t thread;
    int started, joined;
    int ufd, dfd;     /* the thread's own duplicates; -1 once it closed them */
    int notify, ctl;  /* eventfds: thread -> Python, Python -> thread */
    uint32_t fixed, channel, max_data, max_packet_length;
    uint64_t report;
    /* shared with Python (atomics) */
    uint64_t window_total; /* window at start + every grant */
    int stop;
    struct lr_gpump_state st; /* counter/packets/consumed/written/reads/reason: atomics */
    /* the thread's */
    unsigned char *in, *out;
    size_t inlen, outoff, outlen;
    int counted; /* in `live` */
    /* the reverse direction (lr_gpump_seal); seal == NULL: forward only */
    struct lr_gcm *seal;
    uint32_t ofixed, rchannel, rmax;
    uint64_t rwindow;    /* the thread's: what the user's window still takes */
    uint64_t grant_pend; /* Python's grants not yet taken by the thread (atomic) */
    uint64_t grant_hold; /* taken, not yet sealed (no room) */
    uint64_t wsize;      /* > 0: the thread grants by the channel's rule */
    uint64_t credit;     /* written, not yet granted */
    unsigned char *raw, *sb;
    size_t rawoff, rawlen, sboff, sblen;
    unsigned char pad[PAD_POOL];
    size_t padoff;
};

static void wake(int fd)
{
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof one);
    (void)ignored;
}

static void drain(int fd)
{
    uint64_t v;
    ssize_t ignored = read(fd, &v, sizeof v);
    (void)ignored;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)

/* Opens what the buffers allow; returns LR_GP_RUNNING, LR_GP_PACKET or LR_GP_CRYPTO. */
static int open_some(struct lr_gpump *p)
{
    if (p->outoff > 0) {
        memmove(p->out, p->out + p->outoff, p->outlen - p->outoff);
        p->outlen -= p->outoff;
        p->outoff = 0;
    }
    size_t room = OUT_CAP - p->outlen;
    if (p->inlen > 0 && room > 0) {
        uint64_t window = LOAD(p->window_total) - p->st.consumed;
        struct lr_gcm_run r = {
            .counter = p->st.counter, .fixed = p->fixed, .channel = p->channel,
            .window = window, .max_data = p->max_data,
            .max_packet_length = p->max_packet_length,
            .adjusts_ok = p->seal != NULL, .rwindow = p->rwindow,
        };
        if (lr_gcm_open_run(p->gcm, &r, p->in, p->inlen, p->out + p->outlen, room) != 0)
            return LR_GP_CRYPTO;
        if (r.adjusted) {
            p->rwindow += r.adjusted;
            STORE(p->st.adjusted, p->st.adjusted + r.adjusted);
        }
        if (r.packets) {
            memmove(p->in, p->in + r.consumed, p->inlen - r.consumed);
            p->inlen -= r.consumed;
            p->outlen += r.produced;
            room -= r.produced;
            STORE(p->st.counter, r.counter);
            STORE(p->st.packets, p->st.packets + r.packets);
            STORE(p->st.consumed, p->st.consumed + r.produced);
        }
    }
    /* A whole packet left at the head that the out buffer had room for is not one the
     * run takes (another message, over the window, a bad tag...): Python's.  So is a
     * length the run refuses, and a packet longer than the buffer could ever hold. */
    if (p->inlen >= 4) {
        uint32_t plen = be32(p->in);
        if (plen < LR_GCM_BLOCK || plen % LR_GCM_BLOCK || plen > p->max_packet_length ||
            4 + (size_t)plen + LR_GCM_TAG > IN_CAP)
            return LR_GP_PACKET;
        if (p->inlen >= 4 + (size_t)plen + LR_GCM_TAG && room >= plen)
            return LR_GP_PACKET;
    }
    return LR_GP_RUNNING;
}

static void put32(unsigned char *b, uint32_t v)
{
    b[0] = (unsigned char)(v >> 24);
    b[1] = (unsigned char)(v >> 16);
    b[2] = (unsigned char)(v >> 8);
    b[3] = (unsigned char)v;
}

static const unsigned char *padding(struct lr_gpump *p, size_t n)
{
    if (p->padoff + n > PAD_POOL) {
        ssize_t got = getrandom(p->pad, PAD_POOL, 0);
        (void)got; /* the padding is encrypted; a short read only repeats old bytes */
        p->padoff = 0;
    }
    p->padoff += n;
    return p->pad + p->padoff - n;
}

/* Seals one packet (message `msg`, the fields in `fields`, then `data`) at the end
 * of the sealed buffer (the caller checked the room).  0, or LR_GP_CRYPTO. */
static int seal_one(struct lr_gpump *p, const unsigned char *fields, size_t flen,
                    const unsigned char *data, size_t dlen)
{
    size_t n = 1 + flen + dlen; /* message number and payload */
    size_t pad = LR_GCM_BLOCK - ((n + 1) % LR_GCM_BLOCK);
    if (pad < 4)
        pad += LR_GCM_BLOCK;
    unsigned char head[2 + 12];
    head[0] = (unsigned char)pad;
    memcpy(head + 1, fields, flen + 1); /* fields[0] is the message number */
    unsigned char *o = p->sb + p->sblen;
    uint64_t counter = p->st.ocounter;
    if (lr_gcm_seal(p->seal, p->ofixed, counter, head, 2 + flen, data, dlen,
                    padding(p, pad), pad, o) != 0)
        return LR_GP_CRYPTO;
    size_t plain = 1 + n + pad;
    p->sblen += 4 + plain + LR_GCM_TAG;
    STORE(p->st.ocounter, counter + 1);
    STORE(p->st.opackets, p->st.opackets + 1);
    STORE(p->st.oplain, p->st.oplain + plain);
    return 0;
}

/* Seals Python's grants, then what the user's window takes of the agent's bytes. */
static int seal_some(struct lr_gpump *p)
{
    if (p->seal == NULL)
        return LR_GP_RUNNING;
    if (p->sboff > 0) {
        memmove(p->sb, p->sb + p->sboff, p->sblen - p->sboff);
        p->sblen -= p->sboff;
        p->sboff = 0;
    }
    p->grant_hold += __atomic_exchange_n(&p->grant_pend, 0, __ATOMIC_ACQ_REL);
    while (p->grant_hold > 0 && SEAL_CAP - p->sblen >= SEAL_ROOM) {
        uint32_t n = p->grant_hold > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)p->grant_hold;
        unsigned char f[9];
        f[0] = MSG_WINDOW_ADJUST;
        put32(f + 1, p->rchannel);
        put32(f + 5, n);
        if (seal_one(p, f, 8, NULL, 0) != 0)
            return LR_GP_CRYPTO;
        p->grant_hold -= n;
        STORE(p->st.granted, p->st.granted + n);
    }
    while (p->rawoff < p->rawlen && p->rwindow > 0) {
        size_t chunk = p->rawlen - p->rawoff;
        if (chunk > p->rwindow)
            chunk = (size_t)p->rwindow;
        if (chunk > p->rmax)
            chunk = p->rmax;
        if (SEAL_CAP - p->sblen < 4 + 1 + 9 + chunk + 2 * LR_GCM_BLOCK + LR_GCM_TAG + SEAL_ROOM)
            break;
        unsigned char f[9];
        f[0] = MSG_DATA;
        put32(f + 1, p->rchannel);
        put32(f + 5, (uint32_t)chunk);
        if (seal_one(p, f, 8, p->raw + p->rawoff, chunk) != 0)
            return LR_GP_CRYPTO;
        p->rawoff += chunk;
        p->rwindow -= chunk;
        STORE(p->st.sealed, p->st.sealed + chunk);
    }
    if (p->rawoff > 0) {
        memmove(p->raw, p->raw + p->rawoff, p->rawlen - p->rawoff);
        p->rawlen -= p->rawoff;
        p->rawoff = 0;
    }
    return LR_GP_RUNNING;
}

static void *run(void *arg)
{
    struct lr_gpump *p = arg;
    int reason = LR_GP_RUNNING, err = 0;
    uint64_t reported = 0, last_news = lr_now_ms(), stalled_since = 0;
    uint64_t got = 0; /* bytes read either way: bulk is judged on these (lr_bulk.h) */
    struct lr_bulk bulk;

    lr_bulk_init(&bulk, last_news);

    while (reason == LR_GP_RUNNING) {
        if (LOAD(p->stop)) {
            reason = LR_GP_STOPPED;
            break;
        }
        /* a packet that is not ours ends the thread after what it opened is written
         * as far as the data connection takes it now (Python writes the rest) */
        int ending = open_some(p);
        /* write what is opened */
        while (p->outoff < p->outlen) {
            ssize_t n = send(p->dfd, p->out + p->outoff, p->outlen - p->outoff,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                p->outoff += (size_t)n;
                STORE(p->st.written, p->st.written + (uint64_t)n);
                p->credit += (uint64_t)n;
                stalled_since = 0;
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                if (stalled_since == 0)
                    stalled_since = lr_now_ms();
                break;
            }
            reason = LR_GP_DATA_ERROR;
            err = n < 0 ? errno : EPIPE;
            break;
        }
        if (reason == LR_GP_RUNNING)
            reason = ending;
        if (reason == LR_GP_RUNNING && p->wsize && p->credit &&
            LOAD(p->window_total) - p->st.consumed < p->wsize / 2) {
            /* the channel's rule: top the window up once less than half is left */
            __atomic_add_fetch(&p->window_total, p->credit, __ATOMIC_ACQ_REL);
            p->grant_hold += p->credit;
            STORE(p->st.sgranted, p->st.sgranted + p->credit);
            p->credit = 0;
        }
        if (reason == LR_GP_RUNNING)
            reason = seal_some(p);
        /* write what is sealed */
        while (reason == LR_GP_RUNNING && p->sboff < p->sblen) {
            ssize_t n = send(p->ufd, p->sb + p->sboff, p->sblen - p->sboff,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                p->sboff += (size_t)n;
                STORE(p->st.uwritten, p->st.uwritten + (uint64_t)n);
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            reason = LR_GP_USER_ERROR;
            err = n < 0 ? errno : EPIPE;
        }
        if (reason != LR_GP_RUNNING)
            break;
        uint64_t t = lr_now_ms();
        /* news for Python: bytes handed on either way (it meters, grants, counts) */
        uint64_t written = p->st.written + p->st.sealed;
        /* the pause is judged on the bytes handed on (bulk.last_move), bulk on those read */
        if (lr_bulk_update(&bulk, t, written, got, 0)) /* one session: its own rate */
            STORE(p->st.batched, p->st.batched + 1);
        if (written - reported >= p->report) {
            reported = written;
            last_news = t;
            wake(p->notify);
        }
        /* The data connection took nothing for a while: Python's path (its buffer
         * absorbs up to the window and it keeps reading the user's other messages, as
         * it does without the thread). */
        if (stalled_since && t - stalled_since >= STALL_MS) {
            reason = LR_GP_CONGESTED;
            break;
        }
        short uev = (short)((p->inlen < IN_CAP ? POLLIN : 0) |
                            (p->sboff < p->sblen ? POLLOUT : 0));
        short dev = (short)((p->outoff < p->outlen ? POLLOUT : 0) |
                            (p->seal != NULL && p->rawlen < RAW_CAP ? POLLIN : 0));
        struct pollfd fds[3] = {
            {.fd = p->ctl, .events = POLLIN},
            {.fd = uev ? p->ufd : -1, .events = uev},
            {.fd = dev ? p->dfd : -1, .events = dev},
        };
        int timeout = IDLE_MS;
        if (written != reported) {
            /* Python meters what moved: once the bytes pause (or every NEWS_MS) */
            uint64_t due = bulk.last_move + LR_QUIET_MS;
            if (last_news + NEWS_MS < due)
                due = last_news + NEWS_MS;
            timeout = (int)(t >= due ? 0 : due - t);
        }
        if (stalled_since) {
            int left = (int)(STALL_MS - (t - stalled_since));
            if (left < timeout)
                timeout = left;
        }
        if (bulk.batch && timeout > LR_QUIET_MS)
            timeout = LR_QUIET_MS; /* a pause ends SCHED_BATCH before a long sleep */
        if (timeout == 0 && written != reported) {
            reported = written;
            last_news = t;
            wake(p->notify);
            continue;
        }
        int ready = poll(fds, 3, timeout);
        if (ready == 0 && timeout == IDLE_MS) {
            reason = LR_GP_IDLE;
            break;
        }
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            reason = LR_GP_USER_ERROR;
            err = errno;
            break;
        }
        if (fds[0].revents)
            drain(p->ctl);
        if (fds[2].revents && (dev & POLLIN)) {
            ssize_t n = recv(p->dfd, p->raw + p->rawlen, RAW_CAP - p->rawlen, MSG_DONTWAIT);
            if (n > 0) {
                p->rawlen += (size_t)n;
                got += (uint64_t)n;
                STORE(p->st.dreads, p->st.dreads + 1);
            } else if (n == 0) {
                reason = LR_GP_DATA_EOF;
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                reason = LR_GP_DATA_READ;
                err = errno;
            }
        }
        if (reason == LR_GP_RUNNING && fds[1].revents && (uev & POLLIN)) {
            ssize_t n = recv(p->ufd, p->in + p->inlen, IN_CAP - p->inlen, MSG_DONTWAIT);
            if (n > 0) {
                p->inlen += (size_t)n;
                got += (uint64_t)n;
                STORE(p->st.reads, p->st.reads + 1);
            } else if (n == 0) {
                reason = LR_GP_USER_EOF;
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                reason = LR_GP_USER_ERROR;
                err = errno;
            }
        }
    }
    /* Done with the sockets before Python learns it has ended. */
    close(p->ufd);
    close(p->dfd);
    p->ufd = p->dfd = -1;
    p->st.err = err;
    p->st.left = p->inlen;
    p->st.pending = p->outlen - p->outoff;
    p->st.unsealed = p->rawlen - p->rawoff;
    p->st.credit = p->credit;
    p->st.unsent = p->sblen - p->sboff;
    STORE(p->st.reason, reason);
    wake(p->notify);
    return NULL;
}

static void release(struct lr_gpump *p)
{
    if (p->ufd >= 0)
        close(p->ufd);
    if (p->dfd >= 0)
        close(p->dfd);
    if (p->notify >= 0)
        close(p->notify);
    if (p->ctl >= 0)
        close(p->ctl);
    if (p->counted)
        __atomic_sub_fetch(&live, 1, __ATOMIC_ACQ_REL);
    lr_gcm_free(p->gcm);
    lr_gcm_free(p->seal);
    free(p->in);
    free(p->out);
    free(p->raw);
    free(p->sb);
    free(p);
}

struct lr_gpump *lr_gpump_start(const unsigned char *key, size_t keylen, uint32_t fixed,
                                uint64_t counter, uint32_t channel, uint64_t window,
                                uint32_t max_data, uint32_t max_packet_length,
                                int user_fd, int data_fd, const unsigned char *initial,
                                size_t initial_len, uint64_t report)
{
    if (initial_len > IN_CAP || report == 0) {
        errno = EINVAL;
        return NULL;
    }
    struct lr_gpump *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->ufd = p->dfd = p->notify = p->ctl = -1;
    p->gcm = lr_gcm_new(key, keylen);
    p->in = malloc(IN_CAP);
    p->out = malloc(OUT_CAP);
    if (p->gcm == NULL || p->in == NULL || p->out == NULL) {
        release(p);
        errno = ENOMEM;
        return NULL;
    }
    p->ufd = fcntl(user_fd, F_DUPFD_CLOEXEC, 0);
    p->dfd = fcntl(data_fd, F_DUPFD_CLOEXEC, 0);
    p->notify = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->ctl = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->ufd < 0 || p->dfd < 0 || p->notify < 0 || p->ctl < 0) {
        int e = errno;
        release(p);
        errno = e;
        return NULL;
    }
    p->fixed = fixed;
    p->channel = channel;
    p->max_data = max_data;
    p->max_packet_length = max_packet_length;
    p->report = report;
    p->window_total = window;
    p->st.counter = counter;
    memcpy(p->in, initial, initial_len);
    p->inlen = initial_len;
    p->counted = 1;
    if (__atomic_add_fetch(&live, 1, __ATOMIC_ACQ_REL) > LR_GP_MAX) {
        release(p);
        errno = EAGAIN;
        return NULL;
    }
    return p;
}

int lr_gpump_seal(struct lr_gpump *p, const unsigned char *key, size_t keylen, uint32_t fixed,
                  uint64_t counter, uint32_t rchannel, uint64_t rwindow, uint32_t rmax,
                  uint64_t wsize, uint64_t credit)
{
    if (p->started || p->seal != NULL || rmax == 0) {
        errno = EINVAL;
        return -1;
    }
    p->seal = lr_gcm_new_sealer(key, keylen);
    p->raw = malloc(RAW_CAP);
    p->sb = malloc(SEAL_CAP);
    if (p->seal == NULL || p->raw == NULL || p->sb == NULL) {
        errno = ENOMEM;
        return -1; /* lr_gpump_free releases what was made */
    }
    p->ofixed = fixed;
    p->st.ocounter = counter;
    p->rchannel = rchannel;
    p->rwindow = rwindow;
    p->rmax = rmax > SEAL_CAP / 4 ? SEAL_CAP / 4 : rmax;
    p->padoff = PAD_POOL; /* filled on first use */
    p->wsize = wsize;
    p->credit = credit;
    return 0;
}

int lr_gpump_run(struct lr_gpump *p)
{
    if (p->started) {
        errno = EINVAL;
        return -1;
    }
    int rc = pthread_create(&p->thread, NULL, run, p);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    pthread_setname_np(p->thread, "lr-gpump"); /* seen in top -H, perf, /proc */
    p->started = 1;
    return 0;
}

int lr_gpump_fd(struct lr_gpump *p)
{
    return p->notify;
}

static void copy_state(struct lr_gpump *p, struct lr_gpump_state *st)
{
    st->ocounter = LOAD(p->st.ocounter);
    st->opackets = LOAD(p->st.opackets);
    st->oplain = LOAD(p->st.oplain);
    st->sealed = LOAD(p->st.sealed);
    st->uwritten = LOAD(p->st.uwritten);
    st->adjusted = LOAD(p->st.adjusted);
    st->granted = LOAD(p->st.granted);
    st->dreads = LOAD(p->st.dreads);
    st->sgranted = LOAD(p->st.sgranted);
    st->reason = LOAD(p->st.reason);
    st->counter = LOAD(p->st.counter);
    st->packets = LOAD(p->st.packets);
    st->consumed = LOAD(p->st.consumed);
    st->written = LOAD(p->st.written);
    st->reads = LOAD(p->st.reads);
    st->batched = LOAD(p->st.batched);
    if (st->reason != LR_GP_RUNNING) {
        st->err = p->st.err;
        st->left = p->st.left;
        st->pending = p->st.pending;
        st->unsealed = p->st.unsealed;
        st->unsent = p->st.unsent;
        st->credit = p->st.credit;
    } else {
        st->credit = 0;
        st->err = 0;
        st->left = st->pending = st->unsealed = st->unsent = 0;
    }
}

int lr_gpump_poll(struct lr_gpump *p, struct lr_gpump_state *st)
{
    drain(p->notify);
    copy_state(p, st);
    return st->reason != LR_GP_RUNNING;
}

void lr_gpump_grant(struct lr_gpump *p, uint64_t n)
{
    __atomic_add_fetch(&p->window_total, n, __ATOMIC_ACQ_REL);
    wake(p->ctl);
}

void lr_gpump_grant_send(struct lr_gpump *p, uint64_t n)
{
    __atomic_add_fetch(&p->window_total, n, __ATOMIC_ACQ_REL);
    __atomic_add_fetch(&p->grant_pend, n, __ATOMIC_ACQ_REL);
    wake(p->ctl);
}

void lr_gpump_stop(struct lr_gpump *p, struct lr_gpump_state *st)
{
    if (p->started && !p->joined) {
        STORE(p->stop, 1);
        wake(p->ctl);
        pthread_join(p->thread, NULL);
        p->joined = 1;
    }
    copy_state(p, st);
}

void lr_gpump_take(struct lr_gpump *p, unsigned char *left, unsigned char *pending)
{
    if (!p->joined)
        return;
    memcpy(left, p->in, p->inlen);
    memcpy(pending, p->out + p->outoff, p->outlen - p->outoff);
}

void lr_gpump_take_rev(struct lr_gpump *p, unsigned char *unsealed, unsigned char *unsent)
{
    if (!p->joined || p->seal == NULL)
        return;
    memcpy(unsealed, p->raw + p->rawoff, p->rawlen - p->rawoff);
    memcpy(unsent, p->sb + p->sboff, p->sblen - p->sboff);
}

void lr_gpump_free(struct lr_gpump *p)
{
    if (p == NULL)
        return;
    struct lr_gpump_state st;
    lr_gpump_stop(p, &st);
    release(p);
}
