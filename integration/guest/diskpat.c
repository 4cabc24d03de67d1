/*
 * diskpat: a disk workload for the qsup test guest that verifies itself.
 *
 *   diskpat write  DEV START COUNT SEQ     write COUNT 4 KiB blocks from block START, pass SEQ
 *   diskpat verify DEV START COUNT SEQ     every block holds exactly what `write ... SEQ` wrote
 *   diskpat check  DEV START COUNT         every block is internally consistent, whatever its SEQ
 *   diskpat loop   DEV START COUNT [EVERY [RATE_KIBPS]]
 *                                          rewrite the blocks forever, pass after pass
 *
 * DEV is a block device (/dev/vdb) or a file; a bare name (vdb) means /dev/NAME. Blocks are
 * 4 KiB; block B lives at byte offset B * 4096. A block written for pass SEQ holds a header
 * (the magic "DISKPAT1", B, SEQ, then the same three words inverted) followed by 509 words
 * that are a hash of (B, SEQ, word): a block that was never written, went stale (an older SEQ),
 * landed at the wrong offset (its header names another block), or was torn or corrupted (its
 * words do not match its own header) is caught, not only a flipped bit.
 *
 * I/O is O_DIRECT (falling back to buffered I/O where the file system refuses it) and every
 * write run ends with fsync, so what is written has reached the device and what is read comes
 * from the device, not the guest's page cache.
 *
 * `loop` is the background load for live migration (kernel command line guest.diskload=vdX,
 * see integration/guest/README.md). Pass P (P = 1, 2, ...) writes every block with SEQ=P, in
 * block order, then fsyncs. From pass 2 on, each block is first checked to hold pass P-1 (it
 * was written and fsync'd one pass ago), so a write the disk lost or a stale copy after a
 * migration is reported as it is found; the loop goes on. At any instant the region thus holds
 * blocks of pass P followed by blocks of pass P-1: `check` (with the loop stopped) reports
 * seq=MIN..MAX with MAX-MIN <= 1. RATE_KIBPS (0 = as fast as it can) caps the write rate.
 *
 * Output (stdout, line-buffered):
 *   diskpat: wrote N blocks start=S seq=Q dev=DEV                          write
 *   diskpat: ok N blocks start=S seq=MIN..MAX                              verify / check, all good
 *   diskpat: MISMATCH block B want=... got=...                             one bad block (at most 16)
 *   diskpat: MISMATCH total M of N blocks start=S seq=MIN..MAX             verify / check: M bad
 *   diskpat: loop dev=DEV start=S count=N every=E rate_kibps=R             loop, once at start
 *   diskpat: pass P blocks=N errors=E                                      loop, every E passes
 *   diskpat: ERROR ...                                                     it could not do its job
 *
 * Exit status: 0 ok, 1 mismatch (verify/check), 2 usage or I/O error.
 *
 * Built by integration/guest/build.sh: gcc -static -O2, installed as /bin/diskpat.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define WORDS (BLOCK / sizeof(uint64_t))
#define HEADER_WORDS 6u
#define MAGIC 0x3154415050534944ull /* "DISKPAT1" little-endian */
#define MAX_REPORTS 16u
#define LOOP_REPORTS_PER_PASS 4u

static char devpath[256];
static int fd = -1;
static int direct;
static uint64_t *buf;

/* splitmix64's finaliser, as in memcheck.c. */
static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint64_t block_seed(uint64_t block, uint64_t seq)
{
    return mix(mix(block ^ 0x6469736b70617421ull) ^ (seq * 0xc2b2ae3d27d4eb4full));
}

static void fill(uint64_t *p, uint64_t block, uint64_t seq)
{
    p[0] = MAGIC;
    p[1] = block;
    p[2] = seq;
    p[3] = ~MAGIC;
    p[4] = ~block;
    p[5] = ~seq;
    uint64_t seed = block_seed(block, seq);
    for (unsigned w = HEADER_WORDS; w < WORDS; w++)
        p[w] = mix(seed + w);
}

/* What is wrong with a block read back (GOOD: a consistent diskpat block of `block`, any SEQ). */
enum fault { GOOD, UNWRITTEN, BAD_HEADER, MISPLACED, CORRUPT };
static const char *fault_name[] = {"good", "unwritten", "bad-header", "misplaced", "corrupt"};

static enum fault inspect(const uint64_t *p, uint64_t block, unsigned *bad_word)
{
    *bad_word = 0;
    if (p[0] != MAGIC) {
        for (unsigned w = 0; w < WORDS; w++)
            if (p[w])
                return BAD_HEADER;
        return UNWRITTEN;
    }
    for (unsigned w = 0; w < 3; w++)
        if (p[w + 3] != ~p[w]) {
            *bad_word = w + 3;
            return BAD_HEADER;
        }
    if (p[1] != block) {
        *bad_word = 1;
        return MISPLACED;
    }
    uint64_t seed = block_seed(block, p[2]);
    for (unsigned w = HEADER_WORDS; w < WORDS; w++)
        if (p[w] != mix(seed + w)) {
            *bad_word = w;
            return CORRUPT;
        }
    return GOOD;
}

static int parse(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

static void open_dev(const char *dev, int writing)
{
    if (strchr(dev, '/'))
        snprintf(devpath, sizeof devpath, "%s", dev);
    else
        snprintf(devpath, sizeof devpath, "/dev/%s", dev);
    int flags = (writing ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC;
    fd = open(devpath, flags | O_DIRECT, 0644);
    direct = fd >= 0;
    if (fd < 0 && errno == EINVAL) /* a file system without O_DIRECT (tmpfs) */
        fd = open(devpath, flags, 0644);
    if (fd < 0) {
        printf("diskpat: ERROR open %s: %s\n", devpath, strerror(errno));
        exit(2);
    }
    if (posix_memalign((void **)&buf, BLOCK, BLOCK)) {
        printf("diskpat: ERROR no memory\n");
        exit(2);
    }
}

static void io_block(int writing, uint64_t block)
{
    off_t off = (off_t)(block * BLOCK);
    size_t done = 0;
    while (done < BLOCK) {
        ssize_t n = writing ? pwrite(fd, (char *)buf + done, BLOCK - done, off + (off_t)done)
                            : pread(fd, (char *)buf + done, BLOCK - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            printf("diskpat: ERROR %s %s block %" PRIu64 ": %s\n", writing ? "write" : "read", devpath,
                   block, strerror(errno));
            exit(2);
        }
        if (n == 0) { /* past the end of the device or file */
            if (writing) {
                printf("diskpat: ERROR write %s block %" PRIu64 ": no space\n", devpath, block);
                exit(2);
            }
            memset((char *)buf + done, 0, BLOCK - done); /* reads as unwritten */
            break;
        }
        done += (size_t)n;
    }
}

static void sync_dev(void)
{
    if (fsync(fd) != 0) {
        printf("diskpat: ERROR fsync %s: %s\n", devpath, strerror(errno));
        exit(2);
    }
}

static void report(uint64_t block, const char *fault, uint64_t want_seq, int want_known, unsigned word)
{
    char want[64] = "any";
    if (want_known)
        snprintf(want, sizeof want, "%" PRIu64, want_seq);
    printf("diskpat: MISMATCH block %" PRIu64 " %s want=seq:%s got=magic:%016" PRIx64 ",block:%" PRIu64
           ",seq:%" PRIu64 " word=%u\n",
           block, fault, want, buf[0], buf[1], buf[2], word);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static int cmd_write(uint64_t start, uint64_t count, uint64_t seq)
{
    for (uint64_t b = start; b < start + count; b++) {
        fill(buf, b, seq);
        io_block(1, b);
    }
    sync_dev();
    printf("diskpat: wrote %" PRIu64 " blocks start=%" PRIu64 " seq=%" PRIu64 " dev=%s direct=%d\n", count,
           start, seq, devpath, direct);
    return 0;
}

/* verify (want_known: every block must hold seq) or check (any seq, each block consistent). */
static int cmd_verify(uint64_t start, uint64_t count, uint64_t seq, int want_known)
{
    uint64_t bad = 0, min = UINT64_MAX, max = 0;
    for (uint64_t b = start; b < start + count; b++) {
        io_block(0, b);
        unsigned word;
        enum fault f = inspect(buf, b, &word);
        if (f == GOOD) { /* consistent: its SEQ counts in the range, stale or not */
            if (buf[2] < min)
                min = buf[2];
            if (buf[2] > max)
                max = buf[2];
        }
        if (f == GOOD && want_known && buf[2] != seq)
            f = CORRUPT, word = 2;
        if (f == GOOD)
            continue;
        const char *name = fault_name[f];
        if (f == CORRUPT && word == 2)
            name = "stale";
        if (bad++ < MAX_REPORTS)
            report(b, name, seq, want_known, word);
    }
    if (min == UINT64_MAX)
        min = max = 0;
    if (bad) {
        printf("diskpat: MISMATCH total %" PRIu64 " of %" PRIu64 " blocks start=%" PRIu64 " seq=%" PRIu64
               "..%" PRIu64 "\n",
               bad, count, start, min, max);
        return 1;
    }
    printf("diskpat: ok %" PRIu64 " blocks start=%" PRIu64 " seq=%" PRIu64 "..%" PRIu64 "\n", count, start,
           min, max);
    return 0;
}

__attribute__((noreturn)) static void cmd_loop(uint64_t start, uint64_t count, uint64_t every, uint64_t rate_kibps)
{
    printf("diskpat: loop dev=%s start=%" PRIu64 " count=%" PRIu64 " every=%" PRIu64 " rate_kibps=%" PRIu64
           " direct=%d\n",
           devpath, start, count, every, rate_kibps, direct);
    double blocks_per_ns = (double)rate_kibps / 4 / 1e9;
    double tokens = 0, cap = rate_kibps ? (double)rate_kibps / 4 / 10 : 0;
    if (cap < 1)
        cap = 1;
    uint64_t errors = 0, last = now_ns();
    for (uint64_t pass = 1;; pass++) {
        unsigned reported = 0;
        for (uint64_t b = start; b < start + count; b++) {
            if (rate_kibps) {
                uint64_t t = now_ns();
                tokens += (double)(t - last) * blocks_per_ns;
                last = t;
                if (tokens > cap)
                    tokens = cap;
                if (tokens < 1) {
                    sleep_ns((uint64_t)((1 - tokens) / blocks_per_ns) + 1);
                    t = now_ns();
                    tokens += (double)(t - last) * blocks_per_ns;
                    last = t;
                }
                tokens -= 1;
            }
            if (pass > 1) {
                io_block(0, b);
                unsigned word;
                enum fault f = inspect(buf, b, &word);
                const char *name = fault_name[f];
                if (f == GOOD && buf[2] != pass - 1)
                    name = "stale", word = 2;
                else if (f == GOOD)
                    name = NULL;
                if (name) {
                    errors++;
                    if (reported++ < LOOP_REPORTS_PER_PASS)
                        report(b, name, pass - 1, 1, word);
                }
            }
            fill(buf, b, pass);
            io_block(1, b);
        }
        sync_dev();
        if (pass == 1 || pass % every == 0)
            printf("diskpat: pass %" PRIu64 " blocks=%" PRIu64 " errors=%" PRIu64 "\n", pass, count, errors);
    }
}

static int usage(void)
{
    printf("diskpat: ERROR usage: diskpat write|verify DEV START COUNT SEQ | check DEV START COUNT"
           " | loop DEV START COUNT [EVERY [RATE_KIBPS]]\n");
    return 2;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 5)
        return usage();
    const char *cmd = argv[1];
    uint64_t start, count, a = 0, b = 0;
    if (parse(argv[3], &start) || parse(argv[4], &count) || count == 0 || start > (UINT64_MAX / BLOCK) - count)
        return usage();
    if (!strcmp(cmd, "write") || !strcmp(cmd, "verify")) {
        if (argc != 6 || parse(argv[5], &a))
            return usage();
        int writing = cmd[0] == 'w';
        open_dev(argv[2], writing);
        return writing ? cmd_write(start, count, a) : cmd_verify(start, count, a, 1);
    }
    if (!strcmp(cmd, "check")) {
        if (argc != 5)
            return usage();
        open_dev(argv[2], 0);
        return cmd_verify(start, count, 0, 0);
    }
    if (!strcmp(cmd, "loop")) {
        a = 10;
        if (argc > 7 || (argc > 5 && parse(argv[5], &a)) || (argc > 6 && parse(argv[6], &b)) || a == 0)
            return usage();
        open_dev(argv[2], 1);
        cmd_loop(start, count, a, b);
    }
    return usage();
}
