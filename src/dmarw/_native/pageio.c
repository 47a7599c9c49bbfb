/* pageio.c: page contents to a socket, with as little work per byte as Linux allows.
 *
 * send_pages(fd, buf, timeout) writes buf (guest RAM, a page-aligned run) to the connected
 * stream socket fd without copying it: vmsplice hands references to its pages to a pipe of
 * this call's own (1 MiB, the unprivileged limit, or whatever the kernel grants), and splice
 * moves them on to the socket, one pipeful at a time.  Like sendfile from a memfd (the
 * socket holds the pages, so a write made before the receiver reads them reaches it), but
 * for any mapping, and without the page cache's per-page "accessed" bookkeeping on
 * sendfile's read side (perf: a sixth of the migration's sending thread went to the LRU
 * lock taken there; the sender's CPU per GiB fell from 0.198 to 0.127 s on one core).
 * Returns the bytes written (all of head and buf).  OSError with the errno otherwise; an
 * errno of ENOSYS, EPERM or EINVAL from the first vmsplice means nothing reached the socket
 * and vmsplice is not to be had here (the caller falls back to sendfile or sendmsg).
 *
 * head (optional, at most HEAD_MAX bytes): copied into the pipe first and sent just before
 * buf (a frame's head and its pages: no separate send).  pipe (optional): (read fd, write
 * fd) of an empty pipe the caller keeps for its sends (no pipe made and sized per call);
 * after an error it may hold bytes and is to be closed.
 *
 * timeout: None waits as long as it takes; else the seconds any one wait for room in the
 * socket may last (a socket with a timeout is non-blocking underneath: poll waits), then
 * TimeoutError.  A signal that interrupts a wait runs the Python signal handlers (Ctrl-C
 * raises KeyboardInterrupt, the stream is then cut), else the call goes on.
 *
 * No lock: the GIL is released for the whole loop; buf stays exported (so not resized)
 * until the call returns and is only read.
 */
#include "dmarw.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define PIPE_BYTES (1 << 20)
#define HEAD_MAX (32 << 10) /* a head goes into the empty pipe first: well under its 64 KiB minimum */

/* timeout (None or seconds) as poll's milliseconds (-1: no limit); -2 with an exception */
static int
wait_ms_of(PyObject *timeout, const char *fname)
{
    if (timeout == Py_None)
        return -1;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred())
        return -2;
    if (!(t >= 0.0) || t > 86400.0) {
        PyErr_Format(PyExc_ValueError, "%s: timeout %R must be None or in 0..86400 s", fname, timeout);
        return -2;
    }
    return (int)(t * 1000.0 + 0.999);
}

static int
fd_of(PyObject *o)
{
    long fd = PyLong_AsLong(o);
    if (fd == -1 && PyErr_Occurred())
        return -2;
    return fd < 0 || fd > 0x7fffffff ? -1 : (int)fd;
}

/* a caller's pipe: (read fd, write fd); 0 with p[] set, -1 with an exception */
static int
pipe_of(PyObject *o, int p[2])
{
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 2) {
        PyErr_Format(PyExc_TypeError, "send_pages: pipe %R must be None or (read fd, write fd)", o);
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        p[i] = fd_of(PyTuple_GET_ITEM(o, i));
        if (p[i] == -2)
            return -1;
        if (p[i] < 0) {
            PyErr_Format(PyExc_ValueError, "send_pages: pipe %R", o);
            return -1;
        }
    }
    return 0;
}

PyObject *
py_send_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "send_pages(fd, buf, timeout, head=None, pipe=None): three to five arguments");
        return NULL;
    }
    int fd = fd_of(args[0]);
    if (fd == -2)
        return NULL;
    int wait_ms = wait_ms_of(args[2], "send_pages");
    if (wait_ms == -2)
        return NULL;
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "send_pages: fd %R", args[0]);
        return NULL;
    }
    int p[2], own = 1;
    if (nargs == 5 && args[4] != Py_None) {
        if (pipe_of(args[4], p) < 0)
            return NULL;
        own = 0;
    }
    Py_buffer view, hv = {0};
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (nargs >= 4 && args[3] != Py_None) {
        if (PyObject_GetBuffer(args[3], &hv, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (hv.len > HEAD_MAX) {
            PyErr_Format(PyExc_ValueError, "send_pages: a head of %zd bytes (at most %d)", hv.len, HEAD_MAX);
            PyBuffer_Release(&hv);
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    if (own) {
        if (pipe2(p, O_CLOEXEC) < 0) {
            PyBuffer_Release(&hv);
            PyBuffer_Release(&view);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        (void)fcntl(p[1], F_SETPIPE_SZ, PIPE_BYTES); /* best effort: the default pipe is 64 KiB */
    }
    int cap = fcntl(p[1], F_GETPIPE_SZ);
    size_t pipe_bytes = cap > 0 ? (size_t)cap : 65536;
    const unsigned char *base = view.buf;
    size_t n = (size_t)view.len, queued = 0, in_pipe = 0, done = 0, total = (size_t)hv.len + n;
    int err = 0, timed_out = 0;
    if (hv.len) { /* the pipe is empty and holds more than HEAD_MAX: this copies and never blocks */
        ssize_t k = write(p[1], hv.buf, (size_t)hv.len);
        if (k != hv.len) {
            err = k < 0 ? errno : EIO;
            goto fail_errno;
        }
        in_pipe = (size_t)k;
    }
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        while (done < total) {
            if (queued < n && in_pipe < pipe_bytes) { /* nonblocking: a full pipe is spliced first */
                size_t room = pipe_bytes - in_pipe;
                struct iovec iov = {.iov_base = (void *)(base + queued), .iov_len = n - queued < room ? n - queued : room};
                ssize_t k = vmsplice(p[1], &iov, 1, SPLICE_F_NONBLOCK);
                if (k > 0) {
                    queued += (size_t)k;
                    in_pipe += (size_t)k;
                } else if (k == 0 || errno != EAGAIN) {
                    err = k < 0 ? errno : EIO;
                    break;
                }
            }
            ssize_t j = splice(p[0], NULL, fd, NULL, in_pipe, SPLICE_F_MOVE);
            if (j > 0) {
                in_pipe -= (size_t)j;
                done += (size_t)j;
                continue;
            }
            if (j < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { /* a socket with a timeout */
                struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                int r = poll(&pfd, 1, wait_ms);
                if (r > 0)
                    continue;
                if (r == 0) {
                    timed_out = 1;
                    break;
                }
            }
            err = j < 0 ? errno : EPIPE;
            break;
        }
        Py_END_ALLOW_THREADS
        if (err == EINTR) { /* let Python's handlers run (Ctrl-C raises), then go on */
            if (PyErr_CheckSignals() < 0)
                goto fail;
            err = 0;
            continue;
        }
        break;
    }
    if (timed_out) {
        PyErr_Format(PyExc_TimeoutError, "send_pages: the peer took no data for %d ms (%zu of %zu bytes sent)",
                     wait_ms, done, total);
        goto fail;
    }
fail_errno:
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    if (own) {
        close(p[0]);
        close(p[1]);
    }
    PyBuffer_Release(&hv);
    PyBuffer_Release(&view);
    return PyLong_FromSize_t(done);
fail:
    if (own) {
        close(p[0]);
        close(p[1]);
    }
    PyBuffer_Release(&hv);
    PyBuffer_Release(&view);
    return NULL;
}
