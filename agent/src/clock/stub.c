/*
 * The code a clock-skew fault puts in each target's vDSO (see ../clock.rs).
 *
 * It lives in the slack after the vDSO image (bytes no code and no loader ever reads), and
 * each patched function's entry becomes one jump here. It makes the system call, so the
 * kernel side can move the result where bpf_probe_write_user is allowed; where it is not (a
 * locked-down kernel) `chaos_skew.clocks` names the clocks this code moves itself. It stops
 * moving them at the deadline, and once the engine's heartbeat is `bound_ns` old: a killed
 * or frozen engine leaves nothing skewed. The engine writes `chaos_skew` through
 * /proc/PID/mem, so each target carries its own copy. The page is read-only to the target
 * (the vDSO is mapped r-x), so this code writes nothing but the caller's result: it keeps no
 * counts.
 *
 * Freestanding: no libc, no relocations, position independent. Built by
 * scripts/clock-stub.sh into stub_x86_64.bin and stub_aarch64.bin (checked in); the layout
 * (entry points, the data's offset) is read from the object's symbols and checked there.
 */
typedef long i64;
typedef unsigned long u64;

struct timespec_ { i64 sec, nsec; };
struct timeval_ { i64 sec, usec; };

/* Written by the engine; the layout is ClockPage in ../clock.rs. */
struct skew {
	u64 clocks;       /* bit n set: clock id n is moved here */
	i64 offset_ns;
	i64 drift_ppm;
	i64 origin_ns;    /* CLOCK_MONOTONIC at the fault's start */
	i64 deadline_ns;  /* CLOCK_MONOTONIC */
	i64 bound_ns;     /* how old a heartbeat may be */
	i64 heartbeat_ns; /* CLOCK_MONOTONIC of the engine's last beat */
};

extern volatile struct skew chaos_skew __attribute__((visibility("hidden")));

#define NS 1000000000L

#if defined(__x86_64__)
#define NR_CLOCK_GETTIME 228
#define NR_GETTIMEOFDAY 96
static inline long sys2(long nr, long a, long b)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(nr), "D"(a), "S"(b) : "rcx", "r11", "memory");
	return r;
}
#elif defined(__aarch64__)
#define NR_CLOCK_GETTIME 113
#define NR_GETTIMEOFDAY 169
static inline long sys2(long nr, long a, long b)
{
	register long x8 __asm__("x8") = nr;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	__asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1) : "memory");
	return x0;
}
#endif

/* How far a moved clock is moved now: 0 once the fault is over or its owner is gone. */
static __attribute__((noinline)) i64 shift(void)
{
	struct timespec_ m;
	if (sys2(NR_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, (long)&m) != 0)
		return 0;
	i64 now = m.sec * NS + m.nsec;
	if (now >= chaos_skew.deadline_ns || now - chaos_skew.heartbeat_ns > chaos_skew.bound_ns)
		return 0;
	i64 elapsed = now - chaos_skew.origin_ns, ppm = chaos_skew.drift_ppm;
	return chaos_skew.offset_ns + (elapsed / 1000000) * ppm + (elapsed % 1000000) * ppm / 1000000;
}

static __attribute__((used)) int chaos_clock_gettime(int id, struct timespec_ *t)
{
	long r = sys2(NR_CLOCK_GETTIME, id, (long)t);
	if (r != 0 || (unsigned)id > 63 || !((chaos_skew.clocks >> id) & 1))
		return r;
	i64 d = shift();
	if (d == 0)
		return 0;
	i64 sec = t->sec + d / NS, nsec = t->nsec + d % NS;
	if (nsec >= NS) {
		nsec -= NS;
		sec += 1;
	} else if (nsec < 0) {
		nsec += NS;
		sec -= 1;
	}
	t->sec = sec;
	t->nsec = nsec;
	return 0;
}

static __attribute__((used)) int chaos_gettimeofday(struct timeval_ *tv, void *tz)
{
	long r = sys2(NR_GETTIMEOFDAY, (long)tv, (long)tz);
	if (r != 0 || !tv || !(chaos_skew.clocks & 1))
		return r;
	i64 d = shift();
	if (d == 0)
		return 0;
	i64 sec = tv->sec + d / NS, usec = tv->usec + (d % NS) / 1000;
	if (usec >= 1000000) {
		usec -= 1000000;
		sec += 1;
	} else if (usec < 0) {
		usec += 1000000;
		sec -= 1;
	}
	tv->sec = sec;
	tv->usec = usec;
	return 0;
}

#if defined(__x86_64__)
static __attribute__((used)) i64 chaos_time(i64 *t)
{
	struct timespec_ ts = {0, 0};
	chaos_clock_gettime(0 /* CLOCK_REALTIME */, &ts);
	if (t)
		*t = ts.sec;
	return ts.sec;
}
#endif

/* The data, after the code in the same section: reached pc-relatively, no relocation. */
__asm__(".text\n.balign 8\nchaos_skew:\n.zero 56\n");
