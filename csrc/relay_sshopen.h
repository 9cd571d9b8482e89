/* labrelay's native SSH receive loop: opens a run of AES-GCM CHANNEL_DATA packets.
 *
 * Like relay_splice.h this file is both the C header and the cffi cdef
 * (relay/datapath/_splice_build.py reads it verbatim): declarations and integer
 * #defines only.  Include <stddef.h> and <stdint.h> first.  The code is sshopen.c.
 *
 * A stock client sends a bulk stream as 32 KiB CHANNEL_DATA packets; in Python each
 * one costs a parse, a decrypt call, a dispatch and a copy (docs/benchmarks.md, issue
 * 13).  lr_gcm_open_run() takes one read's worth of wire bytes and opens every
 * consecutive packet that is CHANNEL_DATA for the one channel the caller names,
 * within that channel's window and maximum packet, writing the channel's bytes back
 * to back into `out`.  It stops *before* the first packet it does not take whole
 * (incomplete, another message, another channel, over the window, a bad length or
 * padding, a tag that does not verify): the caller's per-packet code handles that
 * packet with the state the run hands back, so the run never decides anything the
 * per-packet code would decide differently; it only does the common case faster.
 *
 * The AEAD is OpenSSL's EVP AES-GCM, from the process's libcrypto loaded with
 * dlopen() (not linked: the wheel stays manylinux, and a host without libcrypto
 * runs the Python path), or from a current OpenSSL built into the module when it was
 * built with LABRELAY_OPENSSL (scripts/openssl).  lr_gcm_available() says whether it
 * could be loaded, lr_gcm_libcrypto() which it is.
 */

#define LR_GCM_TAG 16
#define LR_GCM_BLOCK 16

struct lr_gcm;

struct lr_gcm_run {
    /* in/out: the nonce's invocation counter (RFC 5647), advanced once per packet */
    uint64_t counter;
    /* in: the nonce's fixed field, the recipient channel (the receiver's id), the bytes
     * the channel's window still takes, its maximum data per packet, and the largest
     * packet_length accepted */
    uint32_t fixed;
    uint32_t channel;
    uint64_t window;
    uint32_t max_data;
    uint32_t max_packet_length;
    /* in: also take the peer's WINDOW_ADJUST for `channel` (1) or stop at it (0), and
     * the window the peer had granted for our sends before this run (a credit that
     * would take it past 2^32 - 1 is not taken) */
    uint32_t adjusts_ok;
    uint64_t rwindow;
    /* out: bytes those WINDOW_ADJUSTs added */
    uint64_t adjusted;
    /* out: wire bytes taken, channel bytes written to out, packets taken */
    size_t consumed;
    size_t produced;
    uint32_t packets;
};

/* 1 if libcrypto's EVP AES-GCM could be loaded (once per process), else 0. */
int lr_gcm_available(void);

/* The libcrypto the thread uses, as OpenSSL_version(OPENSSL_VERSION) says, with
 * " (bundled)" when the module carries its own; "" if none could be loaded. */
const char *lr_gcm_libcrypto(void);

/* A decryption context for one key (16 or 32 bytes); NULL if unavailable or bad. */
struct lr_gcm *lr_gcm_new(const unsigned char *key, size_t keylen);
void lr_gcm_free(struct lr_gcm *g);

/* A sealing context for one key (the reverse direction of the thread below). */
struct lr_gcm *lr_gcm_new_sealer(const unsigned char *key, size_t keylen);

/* Seals one packet whose plaintext is head || data || pad (a multiple of 16 bytes;
 * head starts with padding_length) into out: packet_length, the ciphertext, the tag
 * (4 + plain + 16 bytes).  0, or -1 if OpenSSL failed. */
int lr_gcm_seal(struct lr_gcm *g, uint32_t fixed, uint64_t counter, const unsigned char *head,
                size_t headlen, const unsigned char *data, size_t datalen,
                const unsigned char *pad, size_t padlen, unsigned char *out);

/* Opens the run at in[0:inlen] into out[0:outcap] (outcap >= inlen always suffices).
 * Returns 0 (see run->consumed/produced/packets; 0 packets is fine) or -1 if OpenSSL
 * failed in a way that is not a bad tag (the caller then uses its own path). */
int lr_gcm_open_run(struct lr_gcm *g, struct lr_gcm_run *run, const unsigned char *in,
                    size_t inlen, unsigned char *out, size_t outcap);

/* -- the open-and-forward thread (gpump.c) ---------------------------------------
 *
 * For a stock `ssh -J` whose channel rides a pooled data connection
 * (relay/server/pooled.py), one native thread per armed session owns the bulk
 * direction user -> agent: it reads the user's socket, opens the run of that one
 * channel's CHANNEL_DATA packets (lr_gcm_open_run) and writes their bytes to the data
 * connection (POLLOUT when it is full: the back-pressure), so the Python reactor
 * takes no turn per read.  It stops at the first packet it does not take whole
 * (any other message, another channel, over the window, a bad tag or length), at EOF
 * or an error on either socket, or when asked (lr_gpump_stop), and hands back the
 * nonce counter, the packets opened and the bytes it did not consume.
 *
 * The thread works on dup()s of the two sockets, so Python may close its own
 * descriptors at any time: the numbers the thread uses are its own until it ends,
 * and it closes them itself when it stops.  It reports through an eventfd
 * (lr_gpump_fd) when it consumed `report` bytes since the last report, after a short
 * quiet time with unreported bytes, and when it stops; the window towards the user is
 * Python's to grant (lr_gpump_grant), unless the thread seals too (lr_gpump_seal: then
 * it owns the relay -> user direction as well, grants by the channel's rule, and
 * reports 20 ms after the bytes pause or every 500 ms while they flow). */

#define LR_GP_RUNNING 0
#define LR_GP_PACKET 1     /* a packet it does not take whole (or a bad length) */
#define LR_GP_USER_EOF 2   /* the user's socket read 0 */
#define LR_GP_USER_ERROR 3 /* reading the user's socket failed (err) */
#define LR_GP_DATA_ERROR 4 /* writing the data connection failed (err) */
#define LR_GP_STOPPED 5    /* lr_gpump_stop() */
#define LR_GP_CRYPTO 6     /* OpenSSL failed in a way that is not a bad tag */
#define LR_GP_FULL 7       /* the data connection took nothing for a while (congested) */
#define LR_GP_IDLE 8       /* the user sent nothing for a while */
#define LR_GP_DATA_EOF 9   /* the data connection read 0 (Python reads it again) */
#define LR_GP_DATA_READ 10 /* reading the data connection failed (err) */

struct lr_gpump;

struct lr_gpump_state {
    uint64_t counter;  /* the nonce's invocation counter after the packets opened */
    uint64_t packets;  /* packets opened */
    uint64_t consumed; /* channel bytes taken out of packets */
    uint64_t written;  /* channel bytes written to the data connection */
    uint64_t reads;    /* reads of the user's socket */
    int reason;        /* LR_GP_*; LR_GP_RUNNING while it runs */
    int err;           /* errno for the *_ERROR reasons */
    size_t left;       /* after it stopped: wire bytes it did not consume */
    size_t pending;    /* after it stopped: channel bytes not written */
    /* the reverse direction (a thread started with a sealing key) */
    uint64_t ocounter; /* the outgoing nonce's invocation counter */
    uint64_t opackets; /* packets sealed (CHANNEL_DATA and WINDOW_ADJUST) */
    uint64_t oplain;   /* their plaintext bytes (the key's byte budget) */
    uint64_t sealed;   /* channel bytes sealed as CHANNEL_DATA to the user */
    uint64_t uwritten; /* sealed bytes written to the user's socket */
    uint64_t adjusted; /* bytes the user's WINDOW_ADJUSTs credited */
    uint64_t granted;  /* bytes of the WINDOW_ADJUSTs it sealed (Python's and its own) */
    uint64_t sgranted; /* bytes it granted by its own policy (wsize below) */
    uint64_t credit;   /* bytes written and not yet granted (the channel's credit) */
    uint64_t dreads;   /* reads of the data connection */
    size_t unsealed;   /* after it stopped: bytes read from the data connection, not sealed */
    size_t unsent;     /* after it stopped: sealed bytes not written to the user */
    uint64_t batched;  /* times it turned SCHED_BATCH for bulk (gpump.c: BULK_BYTES) */
};

/* Makes the thread's state (lr_gpump_run starts it); NULL (errno set) if it could not (no libcrypto, a bad key,
 * more than LR_GP_MAX at once, no memory, no thread).  `initial` are wire bytes
 * already read from the user's socket (a partial packet).  `window` is what the
 * channel's receive window takes now. */
#define LR_GP_MAX 64
struct lr_gpump *lr_gpump_start(const unsigned char *key, size_t keylen, uint32_t fixed,
                                uint64_t counter, uint32_t channel, uint64_t window,
                                uint32_t max_data, uint32_t max_packet_length,
                                int user_fd, int data_fd, const unsigned char *initial,
                                size_t initial_len, uint64_t report);
/* Before lr_gpump_run: the reverse direction too (the agent's bytes, read from the data
 * connection, sealed as CHANNEL_DATA to the user's channel `rchannel` within its window
 * `rwindow` and `rmax` bytes a packet; the user's WINDOW_ADJUSTs for `channel` taken;
 * Python's grants sealed by the thread).  With `wsize` > 0 the thread also grants by
 * the channel's own rule (relay.ssh.channels.BridgedChannel._grant): the bytes written
 * to the data connection are credit (`credit` at the start), sent as one WINDOW_ADJUST
 * once less than wsize / 2 of the window is left.  0, or -1 (errno). */
int lr_gpump_seal(struct lr_gpump *p, const unsigned char *key, size_t keylen, uint32_t fixed,
                  uint64_t counter, uint32_t rchannel, uint64_t rwindow, uint32_t rmax,
                  uint64_t wsize, uint64_t credit);
/* lr_gpump_start makes the thread's state; this starts it.  0, or -1 (errno). */
int lr_gpump_run(struct lr_gpump *p);
/* Python granted n bytes and the thread seals the WINDOW_ADJUST (sealing threads). */
void lr_gpump_grant_send(struct lr_gpump *p, uint64_t n);
/* After stop: the data connection's bytes it did not seal and the sealed bytes it did
 * not write to the user (sizes from the state). */
void lr_gpump_take_rev(struct lr_gpump *p, unsigned char *unsealed, unsigned char *unsent);
/* The eventfd Python watches (readable when there is news). */
int lr_gpump_fd(struct lr_gpump *p);
/* Clears the eventfd and copies the counters; returns 1 once the thread has ended
 * (then the state is final), else 0. */
int lr_gpump_poll(struct lr_gpump *p, struct lr_gpump_state *st);
/* Python sent a WINDOW_ADJUST of n bytes: the thread may take n more. */
void lr_gpump_grant(struct lr_gpump *p, uint64_t n);
/* Asks the thread to stop and waits for it (it is never blocked but in poll());
 * fills the final state.  Idempotent. */
void lr_gpump_stop(struct lr_gpump *p, struct lr_gpump_state *st);
/* After stop: copies the unconsumed wire bytes and the unwritten channel bytes
 * (sizes from the state). */
void lr_gpump_take(struct lr_gpump *p, unsigned char *left, unsigned char *pending);
/* Stops it if needed and frees everything. */
void lr_gpump_free(struct lr_gpump *p);
