/* lr_gcm_open_run: a run of AES-GCM CHANNEL_DATA packets opened in one call
 * (relay_sshopen.h says what and why).  OpenSSL's EVP API is reached through dlopen;
 * the prototypes below are its stable ABI (OpenSSL 1.1 and 3).  Built with
 * LR_LIBCRYPTO_STATIC (relay/datapath/_splice_build.py, LABRELAY_OPENSSL), the module
 * carries its own libcrypto instead, linked in with its symbols hidden, and the same
 * table points at it: a host whose libcrypto predates OpenSSL's VAES/AVX-512 AES-GCM
 * (Debian 12, Ubuntu 24.04: OpenSSL 3.0) still gets it (docs/fastpath.md). */

#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef LR_LIBCRYPTO_STATIC
#include <openssl/crypto.h>
#include <openssl/evp.h>
#endif

#include "relay_sshopen.h"

#define MSG_CHANNEL_DATA 94
#define MSG_CHANNEL_WINDOW_ADJUST 93
#define HEAD 10 /* padding_length, message number, recipient, data length */

#ifndef LR_LIBCRYPTO_STATIC
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11
typedef struct evp_cipher_ctx EVP_CIPHER_CTX;
typedef struct evp_cipher EVP_CIPHER;
#endif

static struct {
    int tried, ok;
    EVP_CIPHER_CTX *(*ctx_new)(void);
    void (*ctx_free)(EVP_CIPHER_CTX *);
    const EVP_CIPHER *(*aes_128_gcm)(void);
    const EVP_CIPHER *(*aes_256_gcm)(void);
    int (*init)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                const unsigned char *);
    int (*update)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
    int (*final)(EVP_CIPHER_CTX *, unsigned char *, int *);
    int (*ctrl)(EVP_CIPHER_CTX *, int, int, void *);
    int (*einit)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                 const unsigned char *);
    int (*eupdate)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
    int (*efinal)(EVP_CIPHER_CTX *, unsigned char *, int *);
    const char *(*version)(int);
    char bundled;
} evp;

struct lr_gcm {
    EVP_CIPHER_CTX *ctx;
    int sealing; /* made by lr_gcm_new_sealer: encrypts */
};

static int load(void *h, void **slot, const char *name)
{
    *slot = dlsym(h, name);
    return *slot != NULL;
}

#ifdef LR_LIBCRYPTO_STATIC
int lr_gcm_available(void)
{
    if (evp.tried)
        return evp.ok;
    evp.tried = 1;
    /* Our own copy: it reads no openssl.cnf (the host's config is for the host's
     * libcrypto) and registers no atexit cleanup (the forwarding threads may still be
     * running when the interpreter exits). */
    if (OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_NO_ATEXIT, NULL) != 1)
        return 0;
    evp.ctx_new = EVP_CIPHER_CTX_new;
    evp.ctx_free = EVP_CIPHER_CTX_free;
    evp.aes_128_gcm = EVP_aes_128_gcm;
    evp.aes_256_gcm = EVP_aes_256_gcm;
    evp.init = (int (*)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                        const unsigned char *))EVP_DecryptInit_ex;
    evp.update = EVP_DecryptUpdate;
    evp.final = EVP_DecryptFinal_ex;
    evp.ctrl = EVP_CIPHER_CTX_ctrl;
    evp.einit = (int (*)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                         const unsigned char *))EVP_EncryptInit_ex;
    evp.eupdate = EVP_EncryptUpdate;
    evp.efinal = EVP_EncryptFinal_ex;
    evp.version = OpenSSL_version;
    evp.bundled = 1;
    evp.ok = 1;
    return 1;
}
#else
int lr_gcm_available(void)
{
    static const char *const names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"};
    if (evp.tried)
        return evp.ok;
    evp.tried = 1;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !evp.ok; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h == NULL)
            continue;
        evp.ok = load(h, (void **)&evp.ctx_new, "EVP_CIPHER_CTX_new") &&
                 load(h, (void **)&evp.ctx_free, "EVP_CIPHER_CTX_free") &&
                 load(h, (void **)&evp.aes_128_gcm, "EVP_aes_128_gcm") &&
                 load(h, (void **)&evp.aes_256_gcm, "EVP_aes_256_gcm") &&
                 load(h, (void **)&evp.init, "EVP_DecryptInit_ex") &&
                 load(h, (void **)&evp.update, "EVP_DecryptUpdate") &&
                 load(h, (void **)&evp.final, "EVP_DecryptFinal_ex") &&
                 load(h, (void **)&evp.ctrl, "EVP_CIPHER_CTX_ctrl") &&
                 load(h, (void **)&evp.einit, "EVP_EncryptInit_ex") &&
                 load(h, (void **)&evp.eupdate, "EVP_EncryptUpdate") &&
                 load(h, (void **)&evp.efinal, "EVP_EncryptFinal_ex");
        if (!evp.ok)
            dlclose(h);
        else if (!load(h, (void **)&evp.version, "OpenSSL_version"))
            evp.version = NULL; /* OpenSSL 1.0 named it SSLeay_version: say "unknown" */
    }
    return evp.ok;
}
#endif

const char *lr_gcm_libcrypto(void)
{
    static char text[128];
    if (!lr_gcm_available())
        return "";
    if (text[0] == 0)
        snprintf(text, sizeof text, "%s%s",
                 evp.version != NULL ? evp.version(0) : "libcrypto of unknown version",
                 evp.bundled ? " (bundled)" : "");
    return text;
}

static struct lr_gcm *make(const unsigned char *key, size_t keylen, int sealing)
{
    if (!lr_gcm_available() || (keylen != 16 && keylen != 32))
        return NULL;
    struct lr_gcm *g = calloc(1, sizeof *g);
    if (g == NULL)
        return NULL;
    g->ctx = evp.ctx_new();
    const EVP_CIPHER *cipher = keylen == 16 ? evp.aes_128_gcm() : evp.aes_256_gcm();
    /* the default IV length of GCM is the 12 bytes SSH uses */
    g->sealing = sealing;
    if (g->ctx == NULL ||
        (sealing ? evp.einit : evp.init)(g->ctx, cipher, NULL, key, NULL) != 1) {
        lr_gcm_free(g);
        return NULL;
    }
    return g;
}

struct lr_gcm *lr_gcm_new(const unsigned char *key, size_t keylen)
{
    return make(key, keylen, 0);
}

struct lr_gcm *lr_gcm_new_sealer(const unsigned char *key, size_t keylen)
{
    return make(key, keylen, 1);
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

void lr_gcm_free(struct lr_gcm *g)
{
    if (g == NULL)
        return;
    if (g->ctx != NULL)
        evp.ctx_free(g->ctx);
    free(g);
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void nonce(unsigned char iv[12], uint32_t fixed, uint64_t counter)
{
    for (int i = 0; i < 4; i++)
        iv[i] = (unsigned char)(fixed >> (24 - 8 * i));
    for (int i = 0; i < 8; i++)
        iv[4 + i] = (unsigned char)(counter >> (56 - 8 * i));
}

/* Opens the packet at `p` (len bytes of packet_length..tag, all there) into out: the
 * channel's bytes at out[0:*data].  0: taken; 1: not ours to take (the caller's
 * per-packet code handles it); -1: OpenSSL failed. */
static int open_one(struct lr_gcm *g, struct lr_gcm_run *run, uint64_t window,
                    const unsigned char *p, uint32_t plen, unsigned char *out,
                    uint32_t *data)
{
    unsigned char iv[12], head[LR_GCM_BLOCK];
    int n;
    nonce(iv, run->fixed, run->counter);
    if (evp.init(g->ctx, NULL, NULL, NULL, iv) != 1 || evp.update(g->ctx, NULL, &n, p, 4) != 1)
        return -1;
    /* The first block says what the packet is: nothing is acted on before the tag
     * verified, and a packet that is not ours is left whole to the caller. */
    if (evp.update(g->ctx, head, &n, p + 4, LR_GCM_BLOCK) != 1 || n != LR_GCM_BLOCK)
        return -1;
    uint32_t pad = head[0];
    if (head[1] == MSG_CHANNEL_WINDOW_ADJUST && run->adjusts_ok && pad >= 4 &&
        plen == pad + 10 && be32(head + 2) == run->channel) {
        /* the user's credit for the relay's sends on this channel: taken when it keeps
         * the window within 2^32 - 1 (the per-packet code refuses more) */
        uint64_t add = be32(head + 6);
        if (run->rwindow + run->adjusted + add > 0xFFFFFFFFu)
            return 1;
        if (plen > LR_GCM_BLOCK &&
            evp.update(g->ctx, out, &n, p + 4 + LR_GCM_BLOCK, (int)(plen - LR_GCM_BLOCK)) != 1)
            return -1;
        if (evp.ctrl(g->ctx, EVP_CTRL_GCM_SET_TAG, LR_GCM_TAG, (void *)(p + 4 + plen)) != 1)
            return -1;
        if (evp.final(g->ctx, out, &n) != 1)
            return 1;
        *data = 0;
        run->adjusted += add;
        return 0;
    }
    if (head[1] != MSG_CHANNEL_DATA || pad < 4 || pad + HEAD > plen ||
        be32(head + 2) != run->channel)
        return 1;
    uint32_t len = be32(head + 6);
    if (len != plen - pad - HEAD || len > run->max_data || len > window)
        return 1;
    /* the channel's bytes land back to back in out; the padding after them is
     * overwritten by the next packet's (or is past what the run produced) */
    memcpy(out, head + HEAD, LR_GCM_BLOCK - HEAD);
    if (evp.update(g->ctx, out + LR_GCM_BLOCK - HEAD, &n, p + 4 + LR_GCM_BLOCK,
                   (int)(plen - LR_GCM_BLOCK)) != 1)
        return -1;
    if (evp.ctrl(g->ctx, EVP_CTRL_GCM_SET_TAG, LR_GCM_TAG, (void *)(p + 4 + plen)) != 1)
        return -1;
    if (evp.final(g->ctx, out + plen - HEAD, &n) != 1)
        return 1; /* a bad tag: the caller's code disconnects */
    *data = len;
    return 0;
}

int lr_gcm_open_run(struct lr_gcm *g, struct lr_gcm_run *run, const unsigned char *in,
                    size_t inlen, unsigned char *out, size_t outcap)
{
    size_t pos = 0, made = 0;
    uint32_t packets = 0;
    uint64_t window = run->window;
    int rc = 0;
    run->adjusted = 0;
    while (inlen - pos >= 4 + LR_GCM_BLOCK + LR_GCM_TAG) {
        uint32_t plen = be32(in + pos);
        if (plen < LR_GCM_BLOCK || plen % LR_GCM_BLOCK || plen > run->max_packet_length)
            break;
        if (inlen - pos < 4 + (size_t)plen + LR_GCM_TAG || outcap - made < plen)
            break;
        uint32_t data = 0;
        rc = open_one(g, run, window, in + pos, plen, out + made, &data);
        if (rc != 0)
            break;
        pos += 4 + (size_t)plen + LR_GCM_TAG;
        made += data;
        window -= data;
        packets++;
        run->counter++;
    }
    run->consumed = pos;
    run->produced = made;
    run->packets = packets;
    return rc < 0 ? -1 : 0;
}

int lr_gcm_seal(struct lr_gcm *g, uint32_t fixed, uint64_t counter, const unsigned char *head,
                size_t headlen, const unsigned char *data, size_t datalen,
                const unsigned char *pad, size_t padlen, unsigned char *out)
{
    unsigned char iv[12];
    int n;
    size_t plain = headlen + datalen + padlen;
    if (!g->sealing || plain % LR_GCM_BLOCK || plain > 0x7FFFFFFF)
        return -1;
    put32(out, (uint32_t)plain);
    nonce(iv, fixed, counter);
    unsigned char *c = out + 4;
    if (evp.einit(g->ctx, NULL, NULL, NULL, iv) != 1 || evp.eupdate(g->ctx, NULL, &n, out, 4) != 1)
        return -1;
    if (evp.eupdate(g->ctx, c, &n, head, (int)headlen) != 1 || (size_t)n != headlen)
        return -1;
    c += headlen;
    if (datalen) {
        if (evp.eupdate(g->ctx, c, &n, data, (int)datalen) != 1 || (size_t)n != datalen)
            return -1;
        c += datalen;
    }
    if (evp.eupdate(g->ctx, c, &n, pad, (int)padlen) != 1 || (size_t)n != padlen)
        return -1;
    c += padlen;
    if (evp.efinal(g->ctx, c, &n) != 1 || n != 0)
        return -1;
    return evp.ctrl(g->ctx, EVP_CTRL_GCM_GET_TAG, LR_GCM_TAG, c) == 1 ? 0 : -1;
}
