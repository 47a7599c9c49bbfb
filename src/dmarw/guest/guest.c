/*
 * dmarw's guest program: a 32-bit protected-mode, paging-off, freestanding driver for the
 * GPU-like device of dmarw.devices.gpu.
 *
 * Built by the package's build (setup.py, see build.py beside this file):
 *   gcc -m32 -ffreestanding -fno-pic -nostdlib -O2 ... ; ld -T guest.ld ; objcopy -O binary
 * and loaded at 0x1000 by dmarw.guest.load(), which also writes the parameter
 * block at GUEST_PARAMS (0xF000).  The vCPU starts at _start with flat segments.
 *
 * What it does, in batches of `batch` commands:
 *   - it stores to its own memory (the data each command will read, and with
 *     `writer_heavy` = n, a sweep over n * SWEEP_PAGES pages per batch, see sweep()),
 *   - it writes the commands (glmark2 mix: GTT entries, ring dwords, batch and descriptor
 *     chunks, context state; 63% reads, 48% of reads one page) and a FENCE into the
 *     command ring, and rings the doorbell (the MMIO tail register),
 *   - it waits for the fence of the batch before last (spinning on the fence dword in the
 *     status page, then blocking in the WAIT register) and folds every word the device
 *     wrote for that batch into its checksum (so a lost device write changes it).
 * Batch k uses only the half (k & 1) of every memory area, so the batch in flight on the
 * device and the batch the vCPU is preparing never touch the same bytes: the run is
 * deterministic for a seed although device DMA and vCPU stores overlap.
 *
 * It keeps its own record of every page it stored to (vrec) and every page it told the
 * device to write (drec), one bit per page, in guest memory.  At the end it folds drec into
 * the checksum and reports it through the result port (out), then hlt.
 *
 * Result port protocol (32-bit outs, in this order): RESULT_HELLO, (version << 16 | sizeof
 * params); at the end RESULT_DONE then ten words: checksum low, high, commands issued,
 * MMIO probes, their TSC cycles low, high, doorbells, their cycles low, high, WAIT stores.
 * On a fault: RESULT_FAULT, then the fault code, then hlt.
 * The MMIO round trips are timed by the guest itself with rdtsc around the access: the
 * probe reads the ID register (the device callback does nothing), the doorbell stores the
 * tail (the callback wakes the device thread, or runs the batch when the device is inline).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define GUEST_PARAMS 0xF000u
#define PARAMS_MAGIC 0x50474d44u /* "DMGP" */
#define PARAMS_VERSION 1u
#define PAGE 4096u
#define MAX_BATCH 64u
#define SWEEP_PAGES 4096u /* pages per batch a writer-heavy guest rewrites, per unit */

#define RESULT_HELLO 0x48454c4fu /* "OLEH": followed by version << 16 | sizeof params */
#define RESULT_DONE 0x454e4f44u  /* "DONE": followed by ck lo, ck hi, commands */
#define RESULT_FAULT 0x544c5546u /* "FULT": followed by the fault code */

#define FAULT_PARAMS 1u
#define FAULT_DEVICE 2u
#define FAULT_RING 3u

/* Device registers (offsets in the MMIO window), see dmarw/devices/gpu.py. */
#define REG_ID 0x00u
#define REG_RING_BASE_LO 0x08u
#define REG_RING_BASE_HI 0x0cu
#define REG_RING_SIZE 0x10u
#define REG_RING_TAIL 0x18u
#define REG_STATUS 0x1cu
#define REG_HWSP_LO 0x24u
#define REG_HWSP_HI 0x28u
#define REG_WAIT 0x2cu
#define REG_CTRL 0x30u
#define DEVICE_ID 0x55504744u /* "DGPU" */
#define STATUS_ERROR 2u
#define CTRL_ENABLE 1u

/* Ring commands: one 32-byte entry each. */
#define OP_READ 1u
#define OP_WRITE 2u
#define OP_FENCE 3u

/* The access class of a command, for the device's statistics: the order of dmarw.devices.gpu.KINDS. */
enum kind {
    K_PAGE_READ, K_GTT_READ, K_RING_READ, K_BATCH_READ,
    K_STATUS_WRITE, K_PTE_WRITE, K_DESC_WRITE, K_CTX_WRITE,
};

enum area { A_GTT, A_RING, A_CTX, A_BATCH, A_COUNT };

struct area_desc {
    u32 base, size;
};

/* The parameter block: same field order as dmarw.guest.params.PARAMS_FIELDS. */
struct params {
    u32 magic, version;
    u32 stack_top, stack_bottom;
    u32 seed_lo, seed_hi;
    u32 commands, ram_size, batch, writer_heavy;
    u32 mmio_base, ring_gpa, ring_entries, hwsp_gpa;
    u32 vrec_gpa, drec_gpa;
    u32 spin, result_port, hot_pages, probes;
    struct area_desc areas[A_COUNT];
};

struct cmd {
    u32 op, size;
    u32 addr_lo, addr_hi;
    u32 seqno, kind;
    u32 rsvd0, rsvd1;
};

struct wrec {
    u32 addr, size;
};

#define P ((const volatile struct params *)GUEST_PARAMS)

/* bss: the guest's own bookkeeping (claimed and logged at start like every other page). */
static struct wrec writes[2][MAX_BATCH];
static u32 nwrites[2];
static u32 rng_state;
static u32 ck_lo, ck_hi;
static u32 ring_tail;
static u32 *vrec, *drec;
static u64 bell_cycles;
static u32 bells, waits;
static u32 sweep_pos[2]; /* where each half's next sweep starts (a page index) */

extern char __rw_start[], __rw_end[]; /* .data + .bss, page aligned (guest.ld) */

__asm__(
    ".section .text.start,\"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "  movl 0xF008, %esp\n" /* params.stack_top */
    "  call guest_main\n"
    "1: hlt\n"
    "  jmp 1b\n"
    ".previous\n");

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline void mmio_w(u32 reg, u32 v) { *(volatile u32 *)(P->mmio_base + reg) = v; }
static inline u32 mmio_r(u32 reg) { return *(volatile u32 *)(P->mmio_base + reg); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((u64)hi << 32) | lo;
}
static inline void cpu_pause(void) { __asm__ volatile("pause"); }

static void report(u32 v) { outl((u16)P->result_port, v); }

static __attribute__((noreturn)) void fault(u32 code)
{
    report(RESULT_FAULT);
    report(code);
    for (;;)
        __asm__ volatile("hlt");
}

/* xorshift32: the guest's only source of choices, seeded from the parameter block.  Every
 * instruction counts: under an emulating KVM (this machine's runs 32-bit code through the
 * instruction emulator, ~1 us an instruction) the guest is the slowest part of a run. */
static u32 rnd(void)
{
    u32 x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

static u32 below(u32 n) { return (u32)(((u64)rnd() * n) >> 32); }

/* The checksum: two 32-bit lanes (FNV-1a, and a rotate-multiply) over 32-bit words. */
static void fold(u32 w)
{
    ck_lo = (ck_lo ^ w) * 0x01000193u;
    u32 b = ck_hi ^ w;
    ck_hi = ((b << 7) | (b >> 25)) * 0x9e3779b1u;
}

/* Every size the guest uses is a multiple of 4. */
static void fold_words(u32 addr, u32 size)
{
    for (u32 i = 0; i < size; i += 4)
        fold(*(const volatile u32 *)(addr + i));
}

static void mark(u32 *rec, u32 addr, u32 size)
{
    u32 p = addr / PAGE, last = (addr + size - 1) / PAGE;
    for (; p <= last && (p & 31); p++)
        rec[p >> 5] |= 1u << (p & 31);
    for (; p + 31 <= last; p += 32) /* whole words: 32 pages at once */
        rec[p >> 5] = ~0u;
    for (; p <= last; p++)
        rec[p >> 5] |= 1u << (p & 31);
}

/* A store to a page we already own or are claiming: rewrite one dword in place. */
static void touch_range(u32 lo, u32 hi)
{
    for (u32 a = lo & ~(PAGE - 1); a < hi; a += PAGE) {
        volatile u32 *w = (volatile u32 *)(a < lo ? lo : a);
        *w = *w;
    }
}

static void claim(u32 lo, u32 hi)
{
    if (hi <= lo)
        return;
    touch_range(lo, hi);
    mark(vrec, lo, hi - lo);
}

/* An address for `size` bytes aligned to `align` in half `half` of area `a`, one page. */
static u32 pick(enum area a, u32 half, u32 size, u32 align)
{
    u32 half_pages = P->areas[a].size / PAGE / 2;
    u32 hot = P->hot_pages < half_pages ? P->hot_pages : half_pages;
    u32 page = below(100) < 80 ? below(hot) : below(half_pages);
    u32 slots = (PAGE - size) / align + 1;
    return P->areas[a].base + (half * half_pages + page) * PAGE + below(slots) * align;
}

/* The guest's own stores: `size` bytes (a multiple of 4) of PRNG words at addr, every
 * `stride` bytes one word, logged in vrec. */
static void guest_store(u32 addr, u32 size, u32 stride)
{
    for (u32 i = 0; i < size; i += stride)
        *(volatile u32 *)(addr + i) = rnd();
    mark(vrec, addr, size);
}

static void ring_put(u32 op, u32 kind, u32 addr, u32 size, u32 seqno)
{
    volatile struct cmd *c = (volatile struct cmd *)(P->ring_gpa + ring_tail * sizeof(struct cmd));
    c->op = op;
    c->size = size;
    c->addr_lo = addr;
    c->addr_hi = 0;
    c->seqno = seqno;
    c->kind = kind;
    c->rsvd0 = 0;
    c->rsvd1 = 0;
    ring_tail = (ring_tail + 1) % P->ring_entries;
}

static void make_command(u32 half, u32 slot)
{
    u32 kind, size, align, addr;
    enum area a;
    int write = below(100) >= 63;
    if (!write) {
        if (below(100) < 48) {
            kind = K_PAGE_READ;
            a = below(100) < 60 ? A_GTT : A_BATCH;
            size = PAGE;
            align = PAGE;
        } else {
            u32 w = below(100);
            if (w < 40) {
                kind = K_GTT_READ, a = A_GTT, size = 8, align = 8;
            } else if (w < 75) {
                kind = K_RING_READ, a = A_RING, size = 4 * (1 + below(16)), align = 4;
            } else {
                kind = K_BATCH_READ, a = A_BATCH, size = 64 + 4 * below((2048 - 64) / 4 + 1), align = 4;
            }
        }
    } else {
        u32 w = below(100);
        if (w < 35) {
            kind = K_STATUS_WRITE, a = A_RING, size = 4, align = 4;
        } else if (w < 60) {
            kind = K_PTE_WRITE, a = A_GTT, size = 8, align = 8;
        } else if (w < 90) {
            kind = K_DESC_WRITE, a = A_CTX, size = 16 * (1 + below(16)), align = 16;
        } else {
            kind = K_CTX_WRITE, a = A_CTX, size = 256 + 64 * below((2048 - 256) / 64 + 1), align = 64;
        }
    }
    addr = pick(a, half, size, align);
    if (write) {
        mark(drec, addr, size);
        writes[half][nwrites[half]++] = (struct wrec){addr, size};
    } else {
        /* the data the device is about to read: a fresh store of up to 64 bytes in it */
        u32 n = size < 64 ? size : 8 + 4 * below(15);
        guest_store(addr + below((size - n) / 4 + 1) * 4, n, 4);
    }
    ring_put(write ? OP_WRITE : OP_READ, kind, addr, size, slot);
}

/* Store `stamp` to the first word of `pages` pages from addr, and log them. */
static void sweep_run(u32 addr, u32 pages, u32 stamp)
{
#pragma GCC unroll 8 /* one store a page: the loop's own instructions would be most of it */
    for (u32 i = 0; i < pages; i++)
        *(volatile u32 *)(addr + i * PAGE) = stamp;
    if (pages)
        mark(vrec, addr, pages * PAGE);
}

/* A writer-heavy guest, before each doorbell: one word stored on each of the next
 * `writer_heavy` * SWEEP_PAGES pages of this half of the batch area (the device only reads
 * the batch area, and only the half of the batch in flight).  The window moves on every
 * time, wrapping, so successive batches dirty distinct pages, faster than a migration's
 * stream copies them.  The device reads these words, and at the end the guest folds the
 * first word of every batch page into its checksum (sweep_fold): a page whose last store
 * a migration lost changes the result. */
static void sweep(u32 half)
{
    u32 half_pages = P->areas[A_BATCH].size / PAGE / 2;
    u32 n = P->writer_heavy * SWEEP_PAGES;
    if (n > half_pages)
        n = half_pages;
    if (n == 0)
        return;
    u32 base = P->areas[A_BATCH].base + half * half_pages * PAGE;
    u32 pos = sweep_pos[half], stamp = rnd();
    u32 first = n < half_pages - pos ? n : half_pages - pos; /* up to the end of the half */
    sweep_run(base + pos * PAGE, first, stamp);
    sweep_run(base, n - first, stamp); /* and on from its start */
    sweep_pos[half] = (pos + n) % half_pages;
}

static void sweep_fold(void)
{
    if (P->writer_heavy == 0)
        return;
    for (u32 a = P->areas[A_BATCH].base; a < P->areas[A_BATCH].base + P->areas[A_BATCH].size; a += PAGE)
        fold(*(const volatile u32 *)a);
}

static u32 fence_now(void) { return *(const volatile u32 *)P->hwsp_gpa; }

static void wait_fence(u32 seqno)
{
    while (fence_now() < seqno) {
        for (u32 i = 0; i < P->spin && fence_now() < seqno; i++)
            cpu_pause();
        if (fence_now() >= seqno)
            break;
        if (mmio_r(REG_STATUS) & STATUS_ERROR)
            fault(FAULT_DEVICE);
        waits++;
        mmio_w(REG_WAIT, seqno); /* the device holds this store until the fence or a pause */
    }
}

/* After batch j's fence: fold what the device wrote for it, in command order. */
static void harvest(u32 j)
{
    u32 half = j & 1;
    fold(j);
    for (u32 i = 0; i < nwrites[half]; i++)
        fold_words(writes[half][i].addr, writes[half][i].size);
    nwrites[half] = 0;
}

void guest_main(void)
{
    if (P->magic != PARAMS_MAGIC || P->version != PARAMS_VERSION)
        fault(FAULT_PARAMS);
    report(RESULT_HELLO);
    report(PARAMS_VERSION << 16 | sizeof(struct params));
    if (P->batch == 0 || P->batch > MAX_BATCH || P->ring_entries < 2 * (P->batch + 1))
        fault(FAULT_RING);
    if (mmio_r(REG_ID) != DEVICE_ID)
        fault(FAULT_DEVICE);
    u64 p0 = rdtsc();
    for (u32 i = 0; i < P->probes; i++)
        (void)mmio_r(REG_ID);
    u64 probe = rdtsc() - p0;

    vrec = (u32 *)P->vrec_gpa;
    drec = (u32 *)P->drec_gpa;
    /* a bijection of seed_lo for each seed_hi (odd multipliers), never the fixed point 0 */
    u32 x = ((P->seed_lo ^ 0x6a09e667u) * 0x9e3779b1u) ^ (P->seed_hi * 0x85ebca6bu);
    rng_state = x ? x : 1u;
    ck_lo = 0x811c9dc5u; /* FNV-1a 32 offset basis */
    ck_hi = 0x6a09e667u;

    /* claim every page of our own runtime: all later stores there are to logged pages */
    u32 rec_bytes = (P->ram_size / PAGE + 7) / 8;
    claim(P->vrec_gpa, P->vrec_gpa + rec_bytes);
    claim(P->drec_gpa, P->drec_gpa + rec_bytes);
    claim(P->stack_bottom, P->stack_top);
    claim((u32)__rw_start, (u32)__rw_end);
    claim(P->ring_gpa, P->ring_gpa + P->ring_entries * sizeof(struct cmd));
    mark(drec, P->hwsp_gpa, 4); /* the device's fence writes */

    mmio_w(REG_RING_BASE_LO, P->ring_gpa);
    mmio_w(REG_RING_BASE_HI, 0);
    mmio_w(REG_RING_SIZE, P->ring_entries);
    mmio_w(REG_HWSP_LO, P->hwsp_gpa);
    mmio_w(REG_HWSP_HI, 0);
    mmio_w(REG_CTRL, CTRL_ENABLE);

    u32 batches = (P->commands + P->batch - 1) / P->batch;
    u32 issued = 0;
    for (u32 k = 0; k < batches; k++) {
        u32 half = k & 1;
        if (k >= 2) {
            wait_fence(k - 1); /* batch k-2 (fence seqno k-1) used this half */
            harvest(k - 2);
        }
        u32 n = P->commands - issued < P->batch ? P->commands - issued : P->batch;
        for (u32 i = 0; i < n; i++)
            make_command(half, issued + i);
        issued += n;
        sweep(half);
        ring_put(OP_FENCE, 0, P->hwsp_gpa, 4, k + 1);
        u64 t0 = rdtsc();
        mmio_w(REG_RING_TAIL, ring_tail); /* the doorbell */
        bell_cycles += rdtsc() - t0;
        bells++;
    }
    for (u32 j = batches >= 2 ? batches - 2 : 0; j < batches; j++) {
        wait_fence(j + 1);
        harvest(j);
    }
    if (mmio_r(REG_STATUS) & STATUS_ERROR)
        fault(FAULT_DEVICE);

    sweep_fold(); /* what a writer-heavy guest's sweeps left */
    /* and the record of pages the device was told to write */
    fold_words(P->drec_gpa, rec_bytes & ~3u);

    report(RESULT_DONE);
    report(ck_lo);
    report(ck_hi);
    report(issued);
    report(P->probes);
    report((u32)probe);
    report((u32)(probe >> 32));
    report(bells);
    report((u32)bell_cycles);
    report((u32)(bell_cycles >> 32));
    report(waits);
}
