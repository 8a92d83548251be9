/* A companion of libfaketime for the fault campaign's clock-skew fault (tests/faults/campaign.py).
 *
 * Under libfaketime (FAKETIME="-600s", FAKETIME_DONT_FAKE_MONOTONIC=1) librdkafka and
 * Python hang or fail, because libfaketime 0.9.10 leaves two waits inconsistent with the
 * clocks it fakes:
 *
 * - C11 cnd_timedwait(): librdkafka computes its absolute deadlines with gettimeofday()
 *   (faked) and waits with cnd_timedwait() (glibc, not intercepted: real time). With the
 *   clock behind, every deadline lies in the past and librdkafka's threads spin without
 *   making progress; ahead, they sleep ten minutes too long. Here the deadline is moved
 *   from the fake clock to the real one.
 * - clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) (Python's time.sleep): libfaketime
 *   shifts the deadline although the monotonic clock is not faked (EINVAL). Here the
 *   monotonic sleep goes to the kernel unchanged.
 *
 * Everything else (gettimeofday, clock_gettime(CLOCK_REALTIME), time: the timestamps of
 * Kafka records and of the coordinator's logs) stays faked. Loaded before libfaketime:
 * LD_PRELOAD="faketime-fix.so libfaketime.so.1".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <threads.h>
#include <time.h>
#include <unistd.h>

typedef int (*cnd_timedwait_fn)(cnd_t *, mtx_t *, const struct timespec *);
typedef int (*clock_nanosleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);

int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mutex,
                  const struct timespec *restrict deadline) {
    static cnd_timedwait_fn real;
    if (real == NULL)
        real = (cnd_timedwait_fn)dlsym(RTLD_NEXT, "cnd_timedwait");
    struct timeval fake;
    struct timespec now;
    gettimeofday(&fake, NULL);                         /* libfaketime's clock */
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &now);  /* the kernel's */
    long long offset = ((long long)fake.tv_sec - now.tv_sec) * 1000000000LL
                       + (long long)fake.tv_usec * 1000LL - now.tv_nsec;
    long long at = (long long)deadline->tv_sec * 1000000000LL + deadline->tv_nsec - offset;
    if (at < 0)
        at = 0;
    struct timespec real_deadline = {.tv_sec = at / 1000000000LL,
                                     .tv_nsec = at % 1000000000LL};
    return real(cond, mutex, &real_deadline);
}

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request,
                    struct timespec *remain) {
    if (clock == CLOCK_MONOTONIC) {
        long rc = syscall(SYS_clock_nanosleep, clock, flags, request, remain);
        return rc == 0 ? 0 : errno;
    }
    static clock_nanosleep_fn next;
    if (next == NULL)
        next = (clock_nanosleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, request, remain);
}
