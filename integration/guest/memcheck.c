/*
 * memcheck: a memory workload for the qsup test guest that verifies itself.
 *
 *   memcheck [--selftest] SIZE_MB RATE_MBPS
 *
 * It allocates SIZE_MB MiB (mlock'd when possible), fills every 4 KiB page with generation 0
 * of its pattern, then sweeps over the pages forever at RATE_MBPS MiB/s (a token bucket with
 * nanosleep; 0 = as fast as it can). For each page it checks that all 512 64-bit words still
 * hold the pattern of the generation last written, then writes the next generation. A word's
 * pattern is a hash of (page, generation, word), so a page that went missing, went stale
 * (an older generation), or landed at the wrong address is caught, not only a flipped bit.
 *
 * This is what a live migration must preserve: every page is dirtied RATE_MBPS MiB/s, so at
 * QEMU's default limits a migration needs several passes, and a page that the destination
 * got wrong (or an old copy of) is reported on the console.
 *
 * Console lines (stdout, line-buffered; /init points it at /dev/console):
 *   MEMCHECK-START size_mb=S rate_mbps=R pages=N locked=0|1        once, after the first fill
 *   MEMCHECK-OK gen=G pages=N errors=E       after a complete sweep G, at most once every 2 s;
 *                                            E = mismatching pages seen since start
 *   MEMCHECK-MISMATCH page=I gen=G word=W want=HEX got=HEX
 *                                            the first bad word of a page found while checking
 *                                            for generation G (at most 4 lines per 2 s)
 *   MEMCHECK-SELFTEST page=I word=W          --selftest: that word was flipped on purpose,
 *                                            once, after sweep 1 (the next sweep reports it)
 *   MEMCHECK-ERROR ...                       it could not start (bad arguments, no memory)
 *
 * Built by integration/guest/build.sh: gcc -static -O2, installed as /bin/memcheck.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096u
#define WORDS (PAGE / sizeof(uint64_t))
#define OK_EVERY_NS (2ull * 1000000000ull)
#define MISMATCH_WINDOW_NS (2ull * 1000000000ull)
#define MISMATCH_PER_WINDOW 4
/* Pages handled between two looks at the clock. */
#define BATCH 16u

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

/* splitmix64's finaliser: a cheap, well-mixing 64-bit hash. */
static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Per-page seed of a generation; word w's pattern is mix(seed + w). */
static inline uint64_t page_seed(uint64_t page, uint64_t gen)
{
    return mix(mix(page ^ 0x6d656d636865636bull) ^ (gen * 0xc2b2ae3d27d4eb4full));
}

static void fill(uint64_t *p, uint64_t page, uint64_t gen)
{
    uint64_t seed = page_seed(page, gen);
    for (unsigned w = 0; w < WORDS; w++)
        p[w] = mix(seed + w);
}

static uint64_t errors;  /* mismatching pages since start */
static unsigned window_lines;
static uint64_t window_start;

/* Check page against generation gen; report its first bad word. Returns 1 if it was good. */
static int check(const uint64_t *p, uint64_t page, uint64_t gen)
{
    uint64_t seed = page_seed(page, gen);
    for (unsigned w = 0; w < WORDS; w++) {
        uint64_t want = mix(seed + w);
        uint64_t got = p[w];
        if (got == want)
            continue;
        errors++;
        uint64_t t = now_ns();
        if (t - window_start >= MISMATCH_WINDOW_NS) {
            window_start = t;
            window_lines = 0;
        }
        if (window_lines < MISMATCH_PER_WINDOW) {
            window_lines++;
            printf("MEMCHECK-MISMATCH page=%" PRIu64 " gen=%" PRIu64 " word=%u want=%016" PRIx64
                   " got=%016" PRIx64 "\n",
                   page, gen, w, want, got);
        }
        return 0;
    }
    return 1;
}

static int parse(const char *s, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    int selftest = 0;
    unsigned long size_mb, rate;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && strcmp(argv[1], "--selftest") == 0) {
        selftest = 1;
        argv++;
        argc--;
    }
    if (argc != 3 || parse(argv[1], &size_mb) || parse(argv[2], &rate) || size_mb == 0
        || size_mb > 1u << 20) {
        printf("MEMCHECK-ERROR usage: memcheck [--selftest] SIZE_MB RATE_MBPS\n");
        return 2;
    }

    size_t bytes = (size_t)size_mb << 20;
    uint64_t npages = bytes / PAGE;
    uint8_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        printf("MEMCHECK-ERROR mmap %lu MiB: %s\n", size_mb, strerror(errno));
        return 1;
    }
    int locked = mlock(mem, bytes) == 0;
    for (uint64_t i = 0; i < npages; i++) /* touches every page */
        fill((uint64_t *)(mem + i * PAGE), i, 0);
    printf("MEMCHECK-START size_mb=%lu rate_mbps=%lu pages=%" PRIu64 " locked=%d\n", size_mb, rate,
           npages, locked);

    /* Token bucket, in pages: refilled at rate*256 pages/s, holding at most 1/10 s worth. */
    double pages_per_ns = (double)rate * (1u << 20) / PAGE / 1e9;
    double cap = rate ? (double)rate * (1u << 20) / PAGE / 10 : 0;
    if (cap < BATCH)
        cap = BATCH;
    double tokens = 0;
    uint64_t last = now_ns(), last_ok = 0;
    int corrupted = 0;

    for (uint64_t gen = 1;; gen++) {
        for (uint64_t i = 0; i < npages; i++) {
            if (rate && i % BATCH == 0) {
                uint64_t t = now_ns();
                tokens += (double)(t - last) * pages_per_ns;
                last = t;
                if (tokens > cap)
                    tokens = cap;
                if (tokens < BATCH) {
                    sleep_ns((uint64_t)((BATCH - tokens) / pages_per_ns) + 1);
                    t = now_ns();
                    tokens += (double)(t - last) * pages_per_ns;
                    last = t;
                }
                tokens -= BATCH;
            }
            uint64_t *p = (uint64_t *)(mem + i * PAGE);
            check(p, i, gen - 1);
            fill(p, i, gen);
        }
        uint64_t t = now_ns();
        if (last_ok == 0 || t - last_ok >= OK_EVERY_NS) {
            last_ok = t;
            printf("MEMCHECK-OK gen=%" PRIu64 " pages=%" PRIu64 " errors=%" PRIu64 "\n", gen, npages,
                   errors);
        }
        if (selftest && !corrupted && gen == 1) {
            uint64_t page = npages / 2;
            unsigned word = 7;
            volatile uint64_t *w = (volatile uint64_t *)(mem + page * PAGE) + word;
            *w ^= 1ull << 42;
            corrupted = 1;
            printf("MEMCHECK-SELFTEST page=%" PRIu64 " word=%u\n", page, word);
        }
    }
}
