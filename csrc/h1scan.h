/* h1scan: recognise one HTTP/1.1 message head of a deliberately narrow shape.
 *
 * The fast path of Pinion's HTTP/1 observer (agent/core/_http1fast.c) accounts requests
 * whose heads this scanner accepts and hands everything else to the llhttp-based Python
 * observer. So the scanner must accept only heads that llhttp (strict mode, as httptools
 * runs it) parses the same way, and it may decline anything: a decline costs speed, never
 * correctness. Accepted: "METHOD SP origin-form SP HTTP/1.1 CRLF" (GET POST PUT DELETE
 * OPTIONS PATCH) or "HTTP/1.1 SP 200..599 SP reason CRLF" (not 204 or 304), then header
 * lines "token: value CRLF" without obs-fold, without a Proxy-Connection, Upgrade or
 * Transfer-Encoding header, with no Connection header but "Connection: keep-alive", with at most one Content-Length (decimal digits
 * only; a response must have one: without it its body runs to the close), then CRLF.
 * The whole head must be in the buffer and at most H1_MAX_HEAD bytes.
 * No allocation, no state: each call reads at most min(len, H1_MAX_HEAD) bytes. */
#ifndef PINION_H1SCAN_H
#define PINION_H1SCAN_H

#include <stddef.h>
#include <stdint.h>

#define H1_MAX_HEAD 8192
#define H1_MAX_CONTENT_LENGTH 999999999999999ULL /* 15 digits: far below llhttp's overflow */

enum h1_method { H1_GET = 0, H1_POST, H1_PUT, H1_DELETE, H1_OPTIONS, H1_PATCH, H1_METHODS };

typedef struct {
    size_t head_length;      /* bytes of the head, final CRLF CRLF included */
    uint64_t content_length; /* 0 when absent */
    int has_length;          /* a Content-Length was there (responses need one) */
    int method;              /* requests: enum h1_method */
    int status;              /* responses: 200..599 */
} h1_head;

/* 1: a whole head of the accepted shape starts at `data`, described in `out`; 0: not. */
int h1_scan_request(const uint8_t *data, size_t length, h1_head *out);
int h1_scan_response(const uint8_t *data, size_t length, h1_head *out);

extern const char *const h1_method_names[H1_METHODS];

#endif
