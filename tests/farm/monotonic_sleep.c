/* Preloaded ahead of libfaketime on a clock-skewed farm host (tests/farm/hosts.py, skew_clock).

   The host's wall clock is moved with FAKETIME="+30s" and FAKETIME_DONT_FAKE_MONOTONIC=1, so
   that timeouts stay on the true monotonic clock. Debian's libfaketime 0.9.10 then breaks
   Python 3.11's time.sleep, which sleeps with clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME):
   it converts that absolute deadline as if the monotonic clock were faked (subtracting the faked
   wall-clock time), hands the kernel a negative time and Python raises EINVAL
   (wolfcw/libfaketime#426; later libfaketime leaves the deadline alone when monotonic faking is
   off). Faking the monotonic clock instead (the default) makes it read as the wall clock, and
   every timed lock wait hangs: Python computes its deadline on that clock and waits with
   sem_clockwait, which 0.9.10 does not intercept, so the kernel waits until the true monotonic
   clock reaches a wall-clock value (wolfcw/libfaketime#390, #469).

   So this passes CLOCK_MONOTONIC sleeps to the kernel untouched, which is right only while the
   monotonic clock is not faked, and every other clock to libfaketime. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *request,
                    struct timespec *remain) {
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (clock_id == CLOCK_MONOTONIC) {
        int saved = errno; /* clock_nanosleep returns its error and leaves errno alone */
        long done = syscall(SYS_clock_nanosleep, clock_id, flags, request, remain);
        int error = done == 0 ? 0 : errno;
        errno = saved;
        return error;
    }
    if (next == NULL)
        next = (int (*)(clockid_t, int, const struct timespec *, struct timespec *))dlsym(
            RTLD_NEXT, "clock_nanosleep");
    return next(clock_id, flags, request, remain);
}
