/* bench/engine_floor.c: a yardstick, not part of the agent (bench/engine_floor.py builds it).
 *
 * How much a paced request costs when the bytes between a plain socket and a TLS socket are
 * moved by C called straight from uvloop's readiness callbacks (loop.add_reader), OpenSSL
 * working on the memory BIOs of an `ssl.SSLObject` that Python handshook: the floor of the
 * per-connection C engine of docs/fastpath.md (next step 3), without its tunnel framing and
 * HTTP observation. One `Relay` is one agent's end: a plain socket and a TLS socket.
 *
 * The SSL* comes out of `_ssl`'s object by its layout (CPython 3.7+ Modules/_ssl.c: after
 * PyObject_HEAD a PyObject *Socket, then SSL *ssl), checked against the app data CPython
 * sets on every SSL it makes (SSL_set_app_data(ssl, self) in newPySSLSocket). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/ssl.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

/* CPython 3.7+ Modules/_ssl.c PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl, ... ;
 * newPySSLSocket sets SSL_set_app_data(ssl, self): the check that the layout is the one known. */
typedef struct { PyObject_HEAD PyObject *socket; SSL *ssl; } ssl_socket_head;

typedef struct {
    PyObject_HEAD
    PyObject *owner; /* keeps the _ssl object (and its BIOs) alive */
    SSL *ssl;
    BIO *rbio, *wbio;
    int tls_fd, plain_fd;
    char buf[65536];
} Relay;

static void relay_dealloc(Relay *self) { Py_XDECREF(self->owner); Py_TYPE(self)->tp_free(self); }

static int write_all(int fd, const char *p, size_t n) {
    /* blocking is fine here: the paced exchange never fills a socket buffer */
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static PyObject *flush_tls(Relay *self) {
    int pending;
    while ((pending = (int)BIO_ctrl_pending(self->wbio)) > 0) {
        int got = BIO_read(self->wbio, self->buf, pending > (int)sizeof self->buf ? (int)sizeof self->buf : pending);
        if (got <= 0) break;
        if (write_all(self->tls_fd, self->buf, (size_t)got) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *on_tls_readable(Relay *self, PyObject *unused) {
    ssize_t n = read(self->tls_fd, self->buf, sizeof self->buf);
    if (n < 0) { if (errno == EAGAIN) Py_RETURN_NONE; return PyErr_SetFromErrno(PyExc_OSError); }
    if (n == 0) Py_RETURN_NONE;
    BIO_write(self->rbio, self->buf, (int)n);
    for (;;) {
        size_t got = 0;
        if (!SSL_read_ex(self->ssl, self->buf, sizeof self->buf, &got)) {
            int why = SSL_get_error(self->ssl, 0);
            ERR_clear_error();
            if (why == SSL_ERROR_WANT_READ) break;
            PyErr_Format(PyExc_ConnectionError, "TLS read failed (SSL_get_error %d)", why);
            return NULL;
        }
        if (write_all(self->plain_fd, self->buf, got) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    }
    return flush_tls(self); /* TLS 1.3 may answer (tickets, key updates) */
}

static PyObject *on_plain_readable(Relay *self, PyObject *unused) {
    ssize_t n = read(self->plain_fd, self->buf, sizeof self->buf);
    if (n < 0) { if (errno == EAGAIN) Py_RETURN_NONE; return PyErr_SetFromErrno(PyExc_OSError); }
    if (n == 0) Py_RETURN_NONE;
    size_t done = 0;
    if (!SSL_write_ex(self->ssl, self->buf, (size_t)n, &done)) {
        ERR_clear_error();
        PyErr_SetString(PyExc_ConnectionError, "TLS write failed");
        return NULL;
    }
    return flush_tls(self);
}

static PyMethodDef relay_methods[] = {
    {"on_tls_readable", (PyCFunction)on_tls_readable, METH_NOARGS, NULL},
    {"on_plain_readable", (PyCFunction)on_plain_readable, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine_floor.Relay", .tp_basicsize = sizeof(Relay), .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)relay_dealloc, .tp_methods = relay_methods,
};

static PyObject *make(PyObject *mod, PyObject *args) {
    PyObject *sslsock; int tls_fd, plain_fd;
    if (!PyArg_ParseTuple(args, "Oii", &sslsock, &tls_fd, &plain_fd)) return NULL;
    if (strcmp(Py_TYPE(sslsock)->tp_name, "_ssl._SSLSocket") != 0) {
        PyErr_SetString(PyExc_TypeError, "not an _ssl object of the layout known here");
        return NULL;
    }
    SSL *ssl = ((ssl_socket_head *)sslsock)->ssl;
    if (ssl == NULL || SSL_get_app_data(ssl) != (void *)sslsock) {
        PyErr_SetString(PyExc_TypeError, "not an _ssl object of the layout known here");
        return NULL;
    }
    Relay *self = PyObject_New(Relay, &RelayType);
    if (!self) return NULL;
    Py_INCREF(sslsock); self->owner = sslsock; self->ssl = ssl;
    self->rbio = SSL_get_rbio(ssl); self->wbio = SSL_get_wbio(ssl);
    self->tls_fd = tls_fd; self->plain_fd = plain_fd;
    return (PyObject *)self;
}

static PyMethodDef methods[] = {{"make", make, METH_VARARGS, NULL}, {NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "engine_floor", NULL, -1, methods};
PyMODINIT_FUNC PyInit_engine_floor(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    return PyModule_Create(&module);
}
