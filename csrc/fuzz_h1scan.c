/* libFuzzer target for csrc/h1scan.c: the input is one relayed direction, walked the way
 * agent.core._http1fast walks it (a head, then its body by Content-Length or chunked
 * framing, then the next head), as requests and, separately, as responses. Checks: no read
 * outside the input (ASan), every accepted head lies inside the input and the bounded
 * prefix, ends with CRLF CRLF and has fields in range; the body walker only moves forward,
 * stays inside the input and keeps its state in range; the Host finder reads only the input
 * and returns a lower-case printable label. Built and run by
 * tests/unit/test_http1_fast_fuzz.py (bounded) and, longer, as docs/fastpath.md describes:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined csrc/fuzz_h1scan.c csrc/h1scan.c -o fuzz
 *   ./fuzz -max_total_time=600 corpus/ */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "h1scan.h"

static void check_head(const uint8_t *rest, size_t left, const h1_head *head, int request) {
    if (head->head_length < 4 || head->head_length > left || head->head_length > H1_MAX_HEAD ||
        memcmp(rest + head->head_length - 4, "\r\n\r\n", 4) != 0)
        abort();
    if (head->content_length > H1_MAX_CONTENT_LENGTH || (head->chunked && head->content_length))
        abort();
    if (request ? (head->method < 0 || head->method >= H1_METHODS)
                : (head->status < 200 || head->status > 599 || !head->has_length))
        abort();
    /* one Connection header at most; `closes` follows it (and the version, for requests) */
    if ((head->keep_alive && head->close) || (unsigned)head->closes > 1 ||
        (head->close && !head->closes) || (!request && head->closes != head->close))
        abort();
    if (request) { /* the request line ends in HTTP/1.0 or HTTP/1.1; 1.0 closes but with keep-alive */
        const uint8_t *line_end = memchr(rest, '\r', head->head_length);
        int version10;
        if (line_end == NULL || line_end - rest < 9 || memcmp(line_end - 8, "HTTP/1.", 7) != 0)
            abort();
        version10 = line_end[-1] == '0';
        if (head->closes != (version10 ? !head->keep_alive : head->close) || (version10 && head->chunked))
            abort();
    }
}

static void walk(const uint8_t *data, size_t size, int request) {
    size_t pos = 0;
    h1_body body = {H1_BODY_NONE, 0, 0};
    while (pos < size) {
        if (body.state != H1_BODY_NONE) {
            /* the body in two reads, split in the middle, as a relay may see it */
            size_t before = pos, split = pos + (size - pos) / 2;
            int walked = h1_walk_body(&body, data, split, &pos);
            if (walked == 0 && pos < split)
                abort();
            if (walked == 0)
                walked = h1_walk_body(&body, data, size, &pos);
            if (pos < before || pos > size || body.state < H1_BODY_NONE ||
                body.state > H1_CHUNK_LAST_LF || body.digits > H1_MAX_CHUNK_DIGITS)
                abort();
            if (walked < 0 || (walked == 0 && pos != size))
                return;
            continue;
        }
        {
            h1_head head;
            size_t left = size - pos;
            uint8_t *rest = malloc(left); /* exactly the rest, so ASan sees any read past it */
            int ok;
            if (rest == NULL)
                return;
            memcpy(rest, data + pos, left);
            ok = request ? h1_scan_request(rest, left, &head) : h1_scan_response(rest, left, &head);
            if (ok)
                check_head(rest, left, &head, request);
            free(rest);
            if (!ok)
                return;
            pos += head.head_length;
            h1_start_body(&body, &head);
        }
    }
}

/* The Host finder reads only the input, and what it returns is a label of the allowed shape. */
static void host(const uint8_t *data, size_t size) {
    char out[H1_MAX_HOST];
    uint8_t *copy = malloc(size ? size : 1);
    size_t length, i;
    if (copy == NULL)
        return;
    memcpy(copy, data, size);
    length = h1_host_in(copy, size, out);
    free(copy);
    if (length > H1_MAX_HOST)
        abort();
    for (i = 0; i < length; i++)
        if (out[i] < '!' || out[i] > '~' || (out[i] >= 'A' && out[i] <= 'Z'))
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    host(data, size);
    walk(data, size, 1);
    walk(data, size, 0);
    return 0;
}
