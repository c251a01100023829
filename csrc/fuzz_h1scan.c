/* libFuzzer target for csrc/h1scan.c: the input is one relayed direction, scanned the way
 * agent.core._http1fast walks it (heads, bodies skipped by Content-Length), as requests and,
 * separately, as responses. Checks: no read outside the input (ASan), every accepted head
 * lies inside the input and the bounded prefix, ends with CRLF CRLF, and its fields are in
 * range. Built and run by tests/unit/test_http1_fast_fuzz.py (bounded) and, longer, as
 * docs/fastpath.md describes:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined csrc/fuzz_h1scan.c csrc/h1scan.c -o fuzz
 *   ./fuzz -max_total_time=600 corpus/ */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "h1scan.h"

static void walk(const uint8_t *data, size_t size, int request) {
    size_t pos = 0;
    while (pos < size) {
        h1_head head;
        int ok;
        /* a copy of exactly the rest, so ASan sees any read past it */
        size_t left = size - pos;
        uint8_t *rest = malloc(left);
        if (rest == NULL)
            return;
        memcpy(rest, data + pos, left);
        ok = request ? h1_scan_request(rest, left, &head) : h1_scan_response(rest, left, &head);
        if (ok) {
            if (head.head_length < 4 || head.head_length > left || head.head_length > H1_MAX_HEAD ||
                memcmp(rest + head.head_length - 4, "\r\n\r\n", 4) != 0)
                abort();
            if (head.content_length > H1_MAX_CONTENT_LENGTH)
                abort();
            if (request ? (head.method < 0 || head.method >= H1_METHODS)
                        : (head.status < 200 || head.status > 599))
                abort();
        }
        free(rest);
        if (!ok)
            return;
        pos += head.head_length;
        if (head.content_length >= size - pos)
            return;
        pos += (size_t)head.content_length;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    walk(data, size, 1);
    walk(data, size, 0);
    return 0;
}
