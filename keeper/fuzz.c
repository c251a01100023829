/* libFuzzer harness for pinion-keeper's request handling (`make fuzz-keeper`).
 *
 * Input: byte 0 = how many descriptors come with the request (0..3) and whether the message
 * was truncated (bit 7); the rest is the message. Checked after every request: each
 * descriptor it was given is either held by the store or closed (no leak, no double close),
 * the store stays within its bound, every held key is valid, and the reply is one of the
 * protocol's. */
#include <assert.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "keeper.h"

static struct store *store;

static int held(int fd) {
    for (size_t i = 0; i < store->count; i++)
        if (store->items[i].fd == fd) return 1;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (store == NULL) store = store_new(8);
    if (size < 1) return 0;
    int nfds = data[0] & 3, truncated = (data[0] & 0x80) != 0;
    size_t len = size - 1 > MAX_MESSAGE ? MAX_MESSAGE : size - 1;
    int fds[4];
    for (int i = 0; i < nfds; i++) {
        fds[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        assert(fds[i] >= 0);
    }
    char reply[128];
    int result = handle_request(store, -1, (const char *)data + 1, len, truncated, fds, nfds,
                                reply, sizeof(reply));
    assert(result == 0);
    for (int i = 0; i < nfds; i++) {
        int open_now = fcntl(fds[i], F_GETFD) != -1;
        assert(open_now == held(fds[i]));  /* kept, or closed: never leaked */
    }
    assert(store->count <= store->max);
    for (size_t i = 0; i < store->count; i++) {
        assert(valid_key(store->items[i].key, strlen(store->items[i].key)));
        assert(fcntl(store->items[i].fd, F_GETFD) != -1);
    }
    assert(strcmp(reply, "OK") == 0 || strcmp(reply, "END") == 0 || strncmp(reply, "ERR ", 4) == 0);
    if (store->count == store->max) {  /* start over now and then: exercise both paths */
        store_free(store);
        store = store_new(8);
    }
    return 0;
}
