/* agent._arenas: giving back the free pools inside CPython's small-object arenas.
 *
 * pymalloc (Objects/obmalloc.c) carves 1 MiB arenas into 16 KiB pools of one block size each.
 * An arena goes back to the system only when every pool in it is free; a pool freed inside an
 * arena that still holds one live object stays resident for good. After a burst of
 * connections (issue #21) a few objects made mid-burst (a timestamp, a future) pin the arenas
 * the burst added, and the pools it emptied stay resident in every arena: ~1 MiB at 0.2 CPU.
 *
 * `watch()` puts a recorder in front of the arena allocator (PyObject_SetArenaAllocator, a
 * public API): from then on every arena's address is known, exactly. `release()` walks the
 * known arenas' pools and, in each free pool that was ever used, gives back the pages after
 * the first with madvise(MADV_DONTNEED); the first page keeps the pool's header, which links
 * it into its arena's free list. The size class in that header is set to one no pool has,
 * so pymalloc initialises the pool anew when it takes it again (it would otherwise reuse the
 * free list threaded through the pages given back, now zeros). Nothing else changes: the
 * pages come back as zeros at the next touch. Arenas made before `watch()` (the interpreter's
 * start) are not known and are left alone.
 *
 * Everything here runs with the GIL held (pymalloc's own rule), so no allocation can take a
 * pool between the check and the madvise. The pool layout is checked at `watch()` on a block
 * pymalloc just gave: a build whose pools differ (no pymalloc, PYTHONMALLOC=malloc, 4 KiB
 * pools, pages as large as a pool) gets no recorder, and `release()` does nothing. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

/* Objects/obmalloc.c's struct pool_header: the same from 3.8 to 3.13 */
typedef struct pool_header {
    union {
        uint8_t *_padding;
        unsigned int count; /* blocks allocated in the pool; 0: a free pool */
    } ref;
    uint8_t *freeblock;
    struct pool_header *nextpool;
    struct pool_header *prevpool;
    unsigned int arenaindex;
    unsigned int szidx;         /* size class */
    unsigned int nextoffset;
    unsigned int maxnextoffset; /* POOL_SIZE - the block size once carved; 0 in a virgin pool */
} pool_header;

#define POOL_SIZE ((uintptr_t)16384) /* 64-bit builds with the radix tree (the default) */
#define ARENA_SIZE ((size_t)1 << 20)  /* their arenas: 1 MiB */
#define ALIGNMENT 16
#define RELEASED_SZIDX 0xffffu /* no size class: the pool is set up again when taken */
#define MAX_ARENAS 8192        /* 8 GiB of arenas; past it, new ones go unrecorded */

static PyObjectArenaAllocator previous;
static void *arenas[MAX_ARENAS];
static size_t arena_sizes[MAX_ARENAS];
static Py_ssize_t arena_count;
static int watching;
static long page_size;

static void *record_alloc(void *ctx, size_t size) {
    void *arena = previous.alloc(previous.ctx, size);
    /* Only pymalloc's arenas (ARENA_SIZE): CPython 3.11+ takes its frames' stack chunks
     * (16 KiB and up, _PyObject_VirtualAlloc) from this allocator too, and those are live
     * memory whatever their first bytes look like. */
    if (arena != NULL && size == ARENA_SIZE && arena_count < MAX_ARENAS) {
        arenas[arena_count] = arena;
        arena_sizes[arena_count] = size;
        arena_count++;
    }
    return arena;
}

static void record_free(void *ctx, void *arena, size_t size) {
    for (Py_ssize_t i = 0; i < arena_count; i++) {
        if (arenas[i] == arena) {
            arena_count--;
            arenas[i] = arenas[arena_count];
            arena_sizes[i] = arena_sizes[arena_count];
            break;
        }
    }
    previous.free(previous.ctx, arena, size);
}

/* A block pymalloc just gave sits in a pool laid out as this file assumes. */
static int layout_matches(void) {
    void *block = PyObject_Malloc(ALIGNMENT);
    if (block == NULL)
        return 0;
    pool_header *pool = (pool_header *)((uintptr_t)block & ~(POOL_SIZE - 1));
    int ok = pool->szidx == 0 && pool->ref.count >= 1 &&
             pool->maxnextoffset == POOL_SIZE - ALIGNMENT &&
             pool->nextoffset <= POOL_SIZE && (uint8_t *)block > (uint8_t *)pool &&
             (uintptr_t)block - (uintptr_t)pool < POOL_SIZE;
    PyObject_Free(block);
    return ok;
}

static PyObject *watch(PyObject *self, PyObject *unused) {
    if (!watching) {
        page_size = sysconf(_SC_PAGESIZE);
        if (sizeof(void *) != 8 || page_size <= 0 || (uintptr_t)page_size >= POOL_SIZE ||
            !layout_matches())
            Py_RETURN_FALSE;
        PyObject_GetArenaAllocator(&previous);
        PyObjectArenaAllocator recorder = {NULL, record_alloc, record_free};
        PyObject_SetArenaAllocator(&recorder);
        watching = 1;
    }
    Py_RETURN_TRUE;
}

/* release() -> bytes given back (pages of free pools not given back before) */
static PyObject *release(PyObject *self, PyObject *unused) {
    size_t released = 0;
    uintptr_t tail = POOL_SIZE - (uintptr_t)page_size;
    for (Py_ssize_t i = 0; watching && i < arena_count; i++) {
        uintptr_t first = ((uintptr_t)arenas[i] + POOL_SIZE - 1) & ~(POOL_SIZE - 1);
        uintptr_t end = (uintptr_t)arenas[i] + arena_sizes[i];
        unsigned int index = ((pool_header *)first)->arenaindex;
        for (uintptr_t at = first; at + POOL_SIZE <= end; at += POOL_SIZE) {
            pool_header *pool = (pool_header *)at;
            if (pool->ref.count != 0 || pool->maxnextoffset == 0 || pool->szidx == RELEASED_SZIDX)
                continue; /* in use, never carved (untouched: reading maps no memory), or done */
            if (pool->arenaindex != index || pool->szidx >= 64 ||
                pool->maxnextoffset > POOL_SIZE)
                break; /* not a pool of this arena as pymalloc lays them out: leave it all */
            if (madvise((void *)(at + (uintptr_t)page_size), tail, MADV_DONTNEED) == 0) {
                pool->szidx = RELEASED_SZIDX;
                released += tail;
            }
        }
    }
    return PyLong_FromSize_t(released);
}

/* arenas() -> (arenas known, bytes in them) */
static PyObject *known(PyObject *self, PyObject *unused) {
    size_t bytes = 0;
    for (Py_ssize_t i = 0; i < arena_count; i++)
        bytes += arena_sizes[i];
    return Py_BuildValue("nn", arena_count, (Py_ssize_t)bytes);
}

static PyMethodDef methods[] = {
    {"watch", watch, METH_NOARGS,
     "watch() -> bool: record every arena pymalloc maps from now on (False: this build's "
     "pools are not the layout release() knows, nothing is done)"},
    {"release", release, METH_NOARGS,
     "release() -> int: give back the pages of the known arenas' free pools, in bytes"},
    {"arenas", known, METH_NOARGS, "arenas() -> (count, bytes): the arenas recorded"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent._arenas",
    "The free pools of pymalloc's arenas given back (see csrc/arenas.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__arenas(void) { return PyModule_Create(&module); }
