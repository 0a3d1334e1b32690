/* A CPU without AVX-512, on a CPU with it: preloaded into a process (bench/avx2_only.py), this
 * hides AVX-512, AVX-VNNI and AMX from every library that asks the CPU what it can do, so that
 * ONNX Runtime's MLAS, numba's LLVM, numpy, torch's oneDNN and MKL all take the code paths they
 * take on an AVX2-only CPU (issue 13's AMD VM), and their time can be measured here.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, on CPUs that flag `cpuid_fault`) makes
 * every CPUID instruction of the process raise SIGSEGV. The handler runs the real CPUID with
 * faulting briefly off, clears the hidden features' bits from its answer, writes the registers
 * back and steps over the instruction. The setting is inherited by threads and forks and reset by
 * execve, where the preloaded library sets it again. Everything else runs on the real CPU at its
 * real speed: only the choice of kernels changes (its caches, clock and 256-bit units stay this
 * CPU's). A process whose CPUID cannot fault exits at once (status 97) rather than run unmasked.
 *
 * Not hidden: XGETBV (the OS's saved state still covers the 512-bit registers; libraries check it
 * only after CPUID says AVX-512), and glibc's own string functions, which pick their variants
 * before any library loads (bench/avx2_only.py masks those with GLIBC_TUNABLES).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

#define BIT(n) (1u << (n))
/* leaf 7, subleaf 0, EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
static const uint32_t HIDDEN_7_EBX =
    BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
/* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
static const uint32_t HIDDEN_7_ECX = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
/* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
static const uint32_t HIDDEN_7_EDX =
    BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
/* leaf 7, subleaf 1, EAX: AVX-VNNI (the VEX form MLAS also uses for int8), AVX512_BF16 */
static const uint32_t HIDDEN_7_1_EAX = BIT(4) | BIT(5);

static struct sigaction previous;
static volatile unsigned long emulated;

static long cpuid_faults(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void masked_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    cpuid_faults(0);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    cpuid_faults(1);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~HIDDEN_7_EBX;
        r[2] &= ~HIDDEN_7_ECX;
        r[3] &= ~HIDDEN_7_EDX;
    }
    if (leaf == 7 && sub == 1)
        r[0] &= ~HIDDEN_7_1_EAX;
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)reg[REG_RIP];
    /* A faulting CPUID is a general protection fault (SI_KERNEL) at a readable 0F A2. */
    if (info->si_code == SI_KERNEL && ip[0] == 0x0F && ip[1] == 0xA2) {
        unsigned r[4];
        masked_cpuid((unsigned)reg[REG_RAX], (unsigned)reg[REG_RCX], r);
        reg[REG_RAX] = r[0];
        reg[REG_RBX] = r[1];
        reg[REG_RCX] = r[2];
        reg[REG_RDX] = r[3];
        reg[REG_RIP] += 2;
        emulated++;
        return;
    }
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        signal(SIGSEGV, SIG_DFL); /* the instruction runs again and faults, fatally, as before */
    }
}

/* How many CPUID instructions were answered masked: bench/avx2_only.py reads it to tell that the
 * library is loaded and working. */
unsigned long avx2_only_emulated(void) { return emulated; }

__attribute__((constructor)) static void hide_avx512(void) {
    static const char refused[] =
        "avx2_only: no CPUID faulting on this CPU or kernel: not running unmasked\n";
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous);
    if (cpuid_faults(1) != 0) {
        if (write(2, refused, sizeof refused - 1) < 0) { /* nothing more to say */
        }
        _exit(97);
    }
}
